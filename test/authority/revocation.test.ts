// Revocation: a certificate, a device, a batch, a line, a CA; audited per certificate; 'revoked' events
// after the commit; refusals change nothing. Issued certificates point at the CRL and OCSP (publicUrl).
// On SQLite and PostgreSQL.

import assert from 'node:assert/strict';
import { createHash, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { verifyAuditLog } from '../../src/audit/audit-log.js';
import { Authority } from '../../src/authority/authority.js';
import { initAuthority } from '../../src/authority/init.js';
import type { RevokedEvent } from '../../src/authority/revocation.js';
import { HallmarkError, type ErrorCode } from '../../src/errors.js';
import { createCsr } from '../../src/pki/csr.js';
import { encodeNameString } from '../../src/pki/names.js';
import { encodePem } from '../../src/pki/pem.js';
import { forEachDialect, type StoreTarget, withDatabaseUrl } from '../helpers/db.js';
import { opensslText } from '../pki/fixtures.js';
import { hasCode } from '../helpers/assertions.js';

const PASSPHRASE = 'revocation test passphrase';
const ACTOR = 'cli:test';


interface DeviceKey { readonly privateKey: KeyObject; readonly spki: Buffer; readonly udid: string }
function newKey(): DeviceKey {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const spki = publicKey.export({ type: 'spki', format: 'der' });
  return { privateKey, spki, udid: createHash('sha256').update(spki).digest('hex') };
}
const csrOf = (key: DeviceKey): string => encodePem('CERTIFICATE REQUEST', createCsr({ subject: encodeNameString('CN=x'), privateKey: key.privateKey }));

forEachDialect('revocation', async (t: TestContext, target: StoreTarget) => {
  const home = join(target.dir, 'home');
  await withDatabaseUrl(target.url, () => initAuthority({ home, rootDir: join(target.dir, 'root'), org: 'Acme', passphrase: PASSPHRASE, keyBackend: 'file', actor: ACTOR, publicUrl: 'http://pki.acme.test:8080/' }));
  const authority = await Authority.open(home, PASSPHRASE, await target.openStore());
  const registry = authority.registry;
  const events: RevokedEvent[] = [];
  authority.events.on('revoked', (e: RevokedEvent) => events.push(e));
  await registry.createProduct({ name: 'meter', actor: ACTOR });
  let n = 0;
  /** A line of its own with a batch of `count` devices, each with one certificate. */
  const fleet = async (count: number) => {
    const line = `line-${++n}`;
    await registry.createLine({ name: line, ca: 'issuing-1', actor: ACTOR });
    const batch = await registry.createBatch({ product: 'meter', line, quota: count + 5, actor: ACTOR });
    const keys = Array.from({ length: count }, () => newKey());
    await registry.registerDevices(batch, keys.map((k) => ({ publicKeySpki: k.spki })), ACTOR);
    const serials: string[] = [];
    for (const k of keys) serials.push((await authority.issueForDevice({ udid: k.udid, csr: csrOf(k), actor: ACTOR })).serial);
    return { line, batch, keys, serials };
  };
  const statusOf = async (serial: string) => (await authority.store.db.selectFrom('certificates').select(['status', 'revocation_reason', 'revoked_at']).where('serial', '=', serial).executeTakeFirstOrThrow());
  try {
    await t.test('issued device certificates point at the CRL and the OCSP responder of their CA', async () => {
      const { serials: [serial] } = await fleet(1);
      const [row] = await authority.findCertificate(serial!);
      const text = opensslText(row!.der);
      assert.match(text, /X509v3 CRL Distribution Points:[\s\S]*URI:http:\/\/pki\.acme\.test:8080\/crl\/issuing-1\.crl/);
      assert.match(text, /OCSP - URI:http:\/\/pki\.acme\.test:8080\/ocsp/);
      assert.match(text, /CA Issuers - URI:http:\/\/pki\.acme\.test:8080\/ca\/issuing-1\.crt/);
    });

    await t.test('one certificate by serial: revoked with its reason, audited, one event after the commit', async () => {
      const { serials: [a, b] } = await fleet(2);
      events.length = 0;
      const result = await authority.revoke({ serial: a! }, 'keyCompromise', ACTOR);
      assert.equal(result.revoked, 1);
      const s = await statusOf(a!);
      assert.equal(s.status, 'revoked');
      assert.equal(s.revocation_reason, 'keyCompromise');
      assert.equal((await statusOf(b!)).status, 'valid');
      assert.equal(events.length, 1);
      assert.deepEqual(events[0]!.serials, [a]);
      assert.equal(events[0]!.issuer, 'issuing-1');
      const audit = await authority.store.db.selectFrom('audit_log').select(['action', 'target', 'details']).where('action', '=', 'certificate.revoke').where('target', '=', a!).execute();
      assert.equal(audit.length, 1);
      assert.equal(JSON.parse(audit[0]!.details).reason, 'keyCompromise');
      // Again: refused, nothing changes.
      await assert.rejects(authority.revoke({ serial: a! }, 'superseded', ACTOR), hasCode('ILLEGAL_TRANSITION'));
      assert.equal((await statusOf(a!)).revocation_reason, 'keyCompromise');
    });

    await t.test('a device: its certificates revoked and the device may not enrol again', async () => {
      const { keys: [k], serials: [s] } = await fleet(1);
      await authority.issueForDevice({ udid: k!.udid, csr: csrOf(k!), actor: ACTOR }); // a second certificate
      const result = await authority.revoke({ device: k!.udid }, 'keyCompromise', ACTOR);
      assert.equal(result.revoked, 2);
      assert.equal((await statusOf(s!)).status, 'revoked');
      assert.equal((await registry.device(k!.udid)).state, 'revoked');
      await assert.rejects(authority.issueForDevice({ udid: k!.udid, csr: csrOf(k!), actor: ACTOR }), hasCode('DEVICE_NOT_ELIGIBLE'));
      await assert.rejects(authority.revoke({ device: k!.udid }, 'keyCompromise', ACTOR), hasCode('ILLEGAL_TRANSITION'));
    });

    await t.test('a batch and a line: every certificate revoked; the devices keep their identity and get new certificates', async () => {
      const one = await fleet(3);
      const other = await fleet(2);
      const r = await authority.revoke({ batch: one.batch }, 'affiliationChanged', ACTOR);
      assert.equal(r.revoked, 3);
      for (const s of one.serials) assert.equal((await statusOf(s)).status, 'revoked');
      for (const s of other.serials) assert.equal((await statusOf(s)).status, 'valid');
      const again = await authority.issueForDevice({ udid: one.keys[0]!.udid, csr: csrOf(one.keys[0]!), actor: ACTOR });
      assert.equal((await statusOf(again.serial)).status, 'valid');
      const l = await authority.revoke({ line: other.line }, 'cACompromise', ACTOR);
      assert.equal(l.revoked, 2);
      const bulk = await authority.store.db.selectFrom('audit_log').select(['target', 'details']).where('action', '=', 'revocation.bulk').execute();
      assert.ok(bulk.some((b) => b.target === `line ${other.line}` && JSON.parse(b.details).certificatesRevoked === 2));
    });

    await t.test('a revocation made by another process (or through the registry) is announced by the watcher, once', async () => {
      const { serials: [a, b], keys } = await fleet(3);
      const stop = authority.watchRevocations(100);
      const other = await Authority.open(home, PASSPHRASE, await target.openStore());
      try {
        events.length = 0;
        await other.revoke({ serial: a! }, 'superseded', 'cli:other');
        await authority.registry.changeState(keys[2]!.udid, 'decommission', ACTOR);
        const deadline = Date.now() + 5000;
        const seen = () => events.flatMap((e) => e.serials);
        while (Date.now() < deadline && !(seen().includes(a!) && seen().length >= 2)) await new Promise((r) => setTimeout(r, 50));
        assert.ok(seen().includes(a!), 'the other process\'s revocation was announced');
        assert.equal(events.find((e) => e.serials.includes(a!))!.reason, 'superseded');
        assert.equal(seen().length, 2, 'the decommissioned device\'s certificate too, and nothing twice');
        // This process's own revocation is announced at once and not again by the watcher.
        events.length = 0;
        await authority.revoke({ serial: b! }, 'keyCompromise', ACTOR);
        await new Promise((r) => setTimeout(r, 400));
        assert.equal(events.filter((e) => e.serials.includes(b!)).length, 1);
      } finally {
        stop();
        await other.close();
      }
    });

    await t.test('refusals: unknown serial, unknown batch/line/CA, a CA certificate, the root', async () => {
      await assert.rejects(authority.revoke({ serial: 'abcdef' }, 'unspecified', ACTOR), hasCode('CERTIFICATE_NOT_FOUND'));
      await assert.rejects(authority.revoke({ batch: 'b-nope' }, 'unspecified', ACTOR), hasCode('BATCH_NOT_FOUND'));
      await assert.rejects(authority.revoke({ line: 'nope' }, 'unspecified', ACTOR), hasCode('LINE_NOT_FOUND'));
      await assert.rejects(authority.revoke({ ca: 'nope' }, 'unspecified', ACTOR), hasCode('CA_NOT_FOUND'));
      await assert.rejects(authority.revoke({ ca: 'root' }, 'unspecified', ACTOR), hasCode('BAD_REQUEST'));
      const intermediate = (await authority.listCas()).find((c) => c.name === 'issuing-1')!;
      await assert.rejects(authority.revoke({ serial: intermediate.serial! }, 'unspecified', ACTOR), hasCode('BAD_REQUEST'));
      assert.equal((await verifyAuditLog(authority.store.db)).ok, true);
    });
  } finally {
    await authority.close();
  }
});
