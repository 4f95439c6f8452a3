// Authority.issueForDevice: the registry decides who gets an operational certificate and what it
// says. State, registered key and batch quota are checked; subject and identifiers come from the
// registry, never from the CSR. On SQLite and PostgreSQL, one initialised authority per dialect.

import assert from 'node:assert/strict';
import { X509Certificate, createHash, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { verifyAuditLog } from '../../src/audit/audit-log.js';
import { Authority } from '../../src/authority/authority.js';
import { ROOT_FILES } from '../../src/authority/home.js';
import { initAuthority } from '../../src/authority/init.js';
import { OfflineRoot } from '../../src/authority/offline-root.js';
import { HallmarkError, type ErrorCode } from '../../src/errors.js';
import { createCsr } from '../../src/pki/csr.js';
import { encodeNameString } from '../../src/pki/names.js';
import { encodePem } from '../../src/pki/pem.js';
import type { Store } from '../../src/store/database.js';
import { forEachDialect, type StoreTarget, withDatabaseUrl } from '../helpers/db.js';
import { openssl, opensslText, opensslVerify, writePems } from '../pki/fixtures.js';
import { hasCode } from '../helpers/assertions.js';

const PASSPHRASE = 'device issuance test passphrase';
const ORG = 'Acme Devices';
const ACTOR = 'cli:test';


async function initOn(target: StoreTarget, home: string, rootDir: string): Promise<void> {
  await withDatabaseUrl(target.url, () => initAuthority({ home, rootDir, org: ORG, passphrase: PASSPHRASE, keyBackend: 'file', actor: ACTOR, tlsDnsNames: ['ca.test'] }));
}

interface DeviceKey { readonly privateKey: KeyObject; readonly spki: Buffer; readonly udid: string }

function newKey(): DeviceKey {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const spki = publicKey.export({ type: 'spki', format: 'der' });
  return { privateKey, spki, udid: createHash('sha256').update(spki).digest('hex') };
}

const csrOf = (key: DeviceKey, cn = 'device'): string => encodePem('CERTIFICATE REQUEST', createCsr({ subject: encodeNameString(`CN=${cn}`), privateKey: key.privateKey }));

/** A CSR made by openssl that asks for everything a device must not get: its own subject, CA:TRUE, a SAN. */
function greedyCsr(dir: string, key: DeviceKey): Buffer {
  const keyFile = join(dir, `greedy-${key.udid.slice(0, 8)}.key`);
  writeFileSync(keyFile, key.privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600 });
  return openssl(['req', '-new', '-key', keyFile, '-subj', '/CN=evil/O=Evil Corp/serialNumber=EVIL-1', '-outform', 'DER',
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
    '-addext', 'subjectAltName=DNS:evil.example,URI:urn:evil:device,email:evil@example.com']).stdout;
}

async function count(store: Store, table: 'certificates' | 'audit_log'): Promise<number> {
  return Number((await store.db.selectFrom(table).select((eb) => eb.fn.countAll().as('n')).executeTakeFirstOrThrow()).n);
}

async function auditOf(store: Store, action: string, target?: string): Promise<Array<{ actor: string; target: string; details: Record<string, unknown> }>> {
  let q = store.db.selectFrom('audit_log').select(['actor', 'target', 'details']).where('action', '=', action);
  if (target) q = q.where('target', '=', target);
  return (await q.orderBy('seq').execute()).map((r) => ({ actor: r.actor, target: r.target, details: JSON.parse(r.details) as Record<string, unknown> }));
}

forEachDialect('device issuance', async (t: TestContext, target: StoreTarget) => {
  const home = join(target.dir, 'home');
  const rootDir = join(target.dir, 'root');
  await initOn(target, home, rootDir);
  const authority = await Authority.open(home, PASSPHRASE, await target.openStore());
  const registry = authority.registry;
  const observer = await target.openStore();
  const rootPem = join(rootDir, ROOT_FILES.certificate);
  await registry.createProduct({ name: 'meter', validityDays: 90, actor: ACTOR });
  await registry.createLine({ name: 'line-a', ca: 'issuing-1', actor: ACTOR });
  let lineSeq = 0;
  /** A batch on its own line (so per-line counters are exact), with `n` registered devices. */
  const batchWith = async (quota: number, n: number, serial?: (i: number) => string) => {
    const line = `line-t${++lineSeq}`;
    await registry.createLine({ name: line, ca: 'issuing-1', actor: ACTOR });
    const batch = await registry.createBatch({ product: 'meter', line, quota, actor: ACTOR });
    const keys = Array.from({ length: n }, () => newKey());
    await registry.registerDevices(batch, keys.map((k, i) => ({ publicKeySpki: k.spki, serialNumber: serial?.(i) })), ACTOR);
    return { batch, line, keys };
  };
  const certsOf = (udid: string) => observer.db.selectFrom('certificates').selectAll().where('device_udid', '=', udid).orderBy('id').execute();
  try {
    await t.test('subject and SAN come from the registry (UDID, serial number), not from the CSR; openssl verify accepts the certificate', async () => {
      const { batch, keys: [key] } = await batchWith(10, 1, () => 'SN-0042');
      const issued = await authority.issueForDevice({ udid: key!.udid, csr: greedyCsr(target.dir, key!), actor: 'token:factory' });
      const x509 = new X509Certificate(issued.der);
      assert.deepEqual(x509.subject.split('\n').sort(), ['CN=' + key!.udid, 'O=' + ORG, 'OU=meter', 'serialNumber=SN-0042'].sort());
      assert.deepEqual((x509.subjectAltName ?? '').split(', ').sort(), [`URI:urn:hallmark:udid:${key!.udid}`, 'URI:urn:hallmark:serial:SN-0042'].sort());
      assert.equal(x509.ca, false);
      assert.ok(x509.publicKey.export({ type: 'spki', format: 'der' }).equals(key!.spki), 'the registered key');
      const text = opensslText(issued.der);
      assert.doesNotMatch(text, /evil/i, 'nothing of what the CSR asked for');
      assert.match(text, /X509v3 Basic Constraints: critical\s+CA:FALSE/);
      assert.match(text, /X509v3 Key Usage: critical\s+Digital Signature\n/);
      assert.doesNotMatch(text, /Certificate Sign/);
      assert.match(text, /TLS Web Client Authentication/);
      const days = (issued.notAfter.getTime() - issued.notBefore.getTime()) / 86_400_000;
      assert.ok(days >= 89.9 && days <= 90.1, `the product validity (90 days), got ${days}`);
      assert.equal(issued.issuer, 'issuing-1', "the line's CA");
      assert.equal(issued.subject, `serialNumber=SN-0042, CN=${key!.udid}, OU=meter, O=${ORG}`);
      const files = writePems(target.dir, { int: issued.chain[0]!, leaf: issued.der });
      assert.match(opensslVerify(rootPem, files.int!, files.leaf!, ['-x509_strict', '-purpose', 'sslclient']), /leaf\.pem: OK/);
      // Recorded against the device, audited with the batch and line, the device provisioned, one unit of quota taken.
      const rows = await certsOf(key!.udid);
      assert.deepEqual(rows.map((r) => [r.serial, r.device_udid, r.status, r.requested_by]), [[issued.serial, key!.udid, 'valid', 'token:factory']]);
      assert.ok(Buffer.from(rows[0]!.der).equals(issued.der));
      const [audit] = await auditOf(observer, 'certificate.issue', issued.serial);
      assert.deepEqual([audit?.details.device, audit?.details.batch, audit?.details.firstIdentity], [key!.udid, batch, true]);
      const device = await registry.device(key!.udid);
      assert.equal(device.state, 'provisioned');
      assert.ok(device.provisionedAt);
      assert.equal((await registry.batch(batch)).issued, 1);
    });

    await t.test('a device without a serial number gets only the UDID URI; an unknown UDID -> DEVICE_NOT_FOUND', async () => {
      const { keys: [key] } = await batchWith(1, 1);
      const issued = await authority.issueForDevice({ udid: key!.udid.toUpperCase(), csr: csrOf(key!, 'someone-else'), actor: ACTOR });
      const x509 = new X509Certificate(issued.der);
      assert.equal(x509.subjectAltName, `URI:urn:hallmark:udid:${key!.udid}`);
      assert.deepEqual(x509.subject.split('\n'), [`CN=${key!.udid}`, 'OU=meter', `O=${ORG}`]);
      await assert.rejects(authority.issueForDevice({ udid: newKey().udid, csr: csrOf(key!), actor: ACTOR }), hasCode('DEVICE_NOT_FOUND'));
    });

    await t.test('a CSR with a key other than the registered one -> KEY_MISMATCH, audited as issuance.refused, nothing issued', async () => {
      const { batch, keys: [key] } = await batchWith(5, 1);
      const certs = await count(observer, 'certificates');
      await assert.rejects(authority.issueForDevice({ udid: key!.udid, csr: csrOf(newKey()), actor: 'token:x' }), hasCode('KEY_MISMATCH'));
      assert.equal(await count(observer, 'certificates'), certs);
      const audit = await auditOf(observer, 'issuance.refused', key!.udid);
      assert.deepEqual(audit.map((a) => [a.actor, a.details.code, a.details.batch]), [['token:x', 'KEY_MISMATCH', batch]]);
      assert.equal((await registry.device(key!.udid)).state, 'registered');
      assert.deepEqual([(await registry.batch(batch)).issued, (await registry.batch(batch)).refused], [0, 0], 'a key mismatch is not an over-quota refusal');
      // A malformed CSR is refused as such.
      await assert.rejects(authority.issueForDevice({ udid: key!.udid, csr: 'not a csr', actor: ACTOR }), hasCode('BAD_PEM'));
    });

    await t.test('quota 3 with 5 devices: issuances 1..3 succeed, the 4th and 5th -> QUOTA_EXCEEDED, audited and counted on batch and line', async () => {
      const { batch, line, keys } = await batchWith(3, 5);
      const results: Array<string> = [];
      for (const k of keys) {
        try {
          await authority.issueForDevice({ udid: k.udid, csr: csrOf(k), actor: 'token:cm' });
          results.push('ok');
        } catch (err) {
          assert.ok(err instanceof HallmarkError);
          results.push(err.code);
        }
      }
      assert.deepEqual(results, ['ok', 'ok', 'ok', 'QUOTA_EXCEEDED', 'QUOTA_EXCEEDED']);
      const info = await registry.batch(batch);
      assert.deepEqual([info.quota, info.issued, info.refused, info.registered], [3, 3, 2, 5]);
      assert.equal((await registry.listLines()).find((l) => l.name === line)?.refusedIssuances, 2);
      assert.equal((await registry.listLines()).find((l) => l.name === 'line-a')?.refusedIssuances, 0, 'other lines are not blamed');
      for (const k of keys.slice(3)) {
        const audit = await auditOf(observer, 'issuance.quota_exceeded', k.udid);
        assert.deepEqual(audit.map((a) => [a.actor, a.details.batch, a.details.code]), [['token:cm', batch, 'QUOTA_EXCEEDED']]);
        assert.equal((await registry.device(k.udid)).state, 'registered');
        assert.deepEqual(await certsOf(k.udid), []);
      }
      // Renewal of a provisioned device takes no quota (its batch is full).
      const renewed = await authority.issueForDevice({ udid: keys[0]!.udid, csr: csrOf(keys[0]!), actor: ACTOR });
      assert.equal((await certsOf(keys[0]!.udid)).length, 2);
      assert.equal((await auditOf(observer, 'certificate.issue', renewed.serial))[0]?.details.firstIdentity, false);
      const after = await registry.batch(batch);
      assert.deepEqual([after.issued, after.refused], [3, 2]);
      // Still refused for the others, and counted again.
      await assert.rejects(authority.issueForDevice({ udid: keys[4]!.udid, csr: csrOf(keys[4]!), actor: ACTOR }), hasCode('QUOTA_EXCEEDED'));
      assert.equal((await registry.batch(batch)).refused, 3);
      assert.equal((await registry.listLines()).find((l) => l.name === line)?.refusedIssuances, 3);
    });

    await t.test('a batch with quota 0 refuses every first identity', async () => {
      const { batch, keys: [key] } = await batchWith(0, 1);
      await assert.rejects(authority.issueForDevice({ udid: key!.udid, csr: csrOf(key!), actor: ACTOR }), hasCode('QUOTA_EXCEEDED'));
      assert.deepEqual([(await registry.batch(batch)).issued, (await registry.batch(batch)).refused], [0, 1]);
    });

    await t.test('a suspended device -> DEVICE_NOT_ELIGIBLE (audited); after resume it gets a certificate again, without quota', async () => {
      const { batch, keys: [key] } = await batchWith(1, 1);
      await authority.issueForDevice({ udid: key!.udid, csr: csrOf(key!), actor: ACTOR });
      await registry.changeState(key!.udid, 'suspend', ACTOR);
      const certs = await count(observer, 'certificates');
      await assert.rejects(authority.issueForDevice({ udid: key!.udid, csr: csrOf(key!), actor: 'token:dev' }), hasCode('DEVICE_NOT_ELIGIBLE'));
      assert.equal(await count(observer, 'certificates'), certs);
      assert.deepEqual((await auditOf(observer, 'issuance.refused', key!.udid)).map((a) => [a.actor, a.details.code]), [['token:dev', 'DEVICE_NOT_ELIGIBLE']]);
      assert.equal((await registry.device(key!.udid)).state, 'suspended');
      await registry.changeState(key!.udid, 'resume', ACTOR);
      const again = await authority.issueForDevice({ udid: key!.udid, csr: csrOf(key!), actor: ACTOR });
      assert.equal(new X509Certificate(again.der).subject.split('\n')[0], `CN=${key!.udid}`);
      assert.equal((await registry.device(key!.udid)).state, 'active');
      assert.deepEqual([(await registry.batch(batch)).issued, (await registry.batch(batch)).refused], [1, 0], 'quota 1, used once, nothing refused for quota');
    });

    await t.test('decommissioned and revoked devices -> DEVICE_NOT_ELIGIBLE', async () => {
      const { keys: [a, b] } = await batchWith(5, 2);
      await authority.issueForDevice({ udid: a!.udid, csr: csrOf(a!), actor: ACTOR });
      await registry.changeState(a!.udid, 'decommission', ACTOR);
      await registry.changeState(b!.udid, 'revoke', ACTOR);
      for (const k of [a!, b!]) await assert.rejects(authority.issueForDevice({ udid: k.udid, csr: csrOf(k), actor: ACTOR }), hasCode('DEVICE_NOT_ELIGIBLE'));
      assert.deepEqual((await certsOf(a!.udid)).map((c) => c.status), ['revoked']);
      assert.deepEqual(await certsOf(b!.udid), []);
    });

    await t.test('10 devices racing for quota 4 (Promise.all): exactly 4 succeed, 6 QUOTA_EXCEEDED', async () => {
      const { batch, line, keys } = await batchWith(4, 10);
      const csrs = keys.map((k) => csrOf(k));
      const audits = await count(observer, 'audit_log');
      const results = await Promise.allSettled(keys.map((k, i) => authority.issueForDevice({ udid: k.udid, csr: csrs[i]!, actor: 'token:race' })));
      const ok = results.filter((r) => r.status === 'fulfilled');
      const refused = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected');
      assert.equal(ok.length, 4, `exactly the quota succeeds: ${refused.map((r) => String(r.reason)).join('; ')}`);
      for (const r of refused) hasCode('QUOTA_EXCEEDED')(r.reason);
      const info = await registry.batch(batch);
      assert.deepEqual([info.issued, info.refused], [4, 6]);
      assert.equal((await registry.listLines()).find((l) => l.name === line)?.refusedIssuances, 6);
      const issuedRows = await observer.db.selectFrom('certificates').select('device_udid').where('device_udid', 'in', keys.map((k) => k.udid)).execute();
      assert.equal(issuedRows.length, 4, 'exactly 4 certificates exist for the batch');
      assert.equal((await registry.listDevices({ batch, state: 'provisioned' })).items.length, 4);
      assert.equal((await registry.listDevices({ batch, state: 'registered' })).items.length, 6);
      assert.equal((await auditOf(observer, 'issuance.quota_exceeded')).filter((a) => a.details.batch === batch).length, 6);
      assert.equal(await count(observer, 'audit_log'), audits + 10);
      assert.ok((await verifyAuditLog(observer.db)).ok);
    });

    await t.test('concurrent first issuances for one device take one unit of quota, and none is refused', async () => {
      const { batch, keys: [key] } = await batchWith(1, 1);
      const results = await Promise.allSettled(Array.from({ length: 5 }, () => authority.issueForDevice({ udid: key!.udid, csr: csrOf(key!), actor: ACTOR })));
      assert.deepEqual(results.map((r) => r.status), Array(5).fill('fulfilled'), results.map((r) => (r.status === 'rejected' ? String(r.reason) : 'ok')).join('; '));
      const info = await registry.batch(batch);
      assert.deepEqual([info.issued, info.refused], [1, 0]);
      assert.equal((await certsOf(key!.udid)).length, 5);
    });

    await t.test('a device whose first identity commits while its second request is under way is renewed, not refused for quota', async () => {
      // The second request reads the device (still "registered"), then the first commits and fills
      // the batch's quota of 1: the second must be treated as a renewal, not counted as overproduction.
      const { batch, line, keys: [key] } = await batchWith(1, 1);
      const original = registry.deviceRow.bind(registry);
      let gate: Promise<unknown> | undefined;
      registry.deviceRow = async (udid: string) => {
        const wait = gate;
        const row = await original(udid);
        if (wait) await wait;
        return row;
      };
      try {
        let releaseFirst!: () => void;
        const firstDone = new Promise<void>((r) => { releaseFirst = r; });
        gate = firstDone;
        const second = authority.issueForDevice({ udid: key!.udid, csr: csrOf(key!), actor: 'token:second' });
        gate = undefined;
        await authority.issueForDevice({ udid: key!.udid, csr: csrOf(key!), actor: 'token:first' });
        releaseFirst();
        const renewed = await second;
        assert.equal(new X509Certificate(renewed.der).subject.split('\n')[0], `CN=${key!.udid}`);
      } finally {
        registry.deviceRow = original;
      }
      const info = await registry.batch(batch);
      assert.deepEqual([info.issued, info.refused], [1, 0]);
      assert.equal((await registry.listLines()).find((l) => l.name === line)?.refusedIssuances, 0);
      assert.deepEqual(await auditOf(observer, 'issuance.quota_exceeded', key!.udid), []);
      assert.equal((await certsOf(key!.udid)).length, 2);
    });

    await t.test('a line whose CA is still pending -> CA_NOT_ACTIVE (no quota taken) until the CA is installed', async () => {
      const { csrPem } = await authority.requestCa({ name: 'line-p-ca', actor: ACTOR });
      await registry.createLine({ name: 'line-p', ca: 'line-p-ca', actor: ACTOR });
      assert.equal((await registry.listLines()).find((l) => l.name === 'line-p')?.caStatus, 'pending');
      const batch = await registry.createBatch({ product: 'meter', line: 'line-p', quota: 1, actor: ACTOR });
      const key = newKey();
      await registry.registerDevice(batch, { publicKeySpki: key.spki }, ACTOR);
      await assert.rejects(authority.issueForDevice({ udid: key.udid, csr: csrOf(key), actor: ACTOR }), hasCode('CA_NOT_ACTIVE'));
      assert.equal((await registry.device(key.udid)).state, 'registered');
      assert.deepEqual([(await registry.batch(batch)).issued, (await registry.batch(batch)).refused], [0, 0]);
      assert.deepEqual(await certsOf(key.udid), []);
      const root = await OfflineRoot.open(rootDir, PASSPHRASE);
      let signed: Buffer;
      try {
        signed = (await root.signIntermediate({ csr: csrPem, pathLen: 0 })).der;
      } finally {
        await root.close();
      }
      await authority.installCa({ certificate: signed, actor: ACTOR });
      const issued = await authority.issueForDevice({ udid: key.udid, csr: csrOf(key), actor: ACTOR });
      assert.equal(issued.issuer, 'line-p-ca');
      assert.ok(issued.chain[0]!.equals(signed));
      const files = writePems(target.dir, { linep: signed, leafp: issued.der });
      assert.match(opensslVerify(rootPem, files.linep!, files.leafp!, ['-x509_strict']), /: OK/);
      assert.equal((await registry.batch(batch)).issued, 1);
    });

    await t.test('the audit chain verifies after all of it', async () => {
      const verdict = await verifyAuditLog(observer.db);
      assert.ok(verdict.ok, JSON.stringify(verdict));
    });
  } finally {
    await authority.close();
  }
}, { timeout: 180_000 });
