import assert from 'node:assert/strict';
import { X509Certificate as NodeX509, randomBytes, type KeyObject } from 'node:crypto';
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { verifyAuditLog } from '../../src/audit/audit-log.js';
import { Authority } from '../../src/authority/authority.js';
import { HOME_FILES, ROOT_FILES, loadHomeConfig } from '../../src/authority/home.js';
import { initAuthority } from '../../src/authority/init.js';
import { OfflineRoot } from '../../src/authority/offline-root.js';
import { HallmarkError, type ErrorCode } from '../../src/errors.js';
import type { KeyRef } from '../../src/keys/key-backend.js';
import { createCsr } from '../../src/pki/csr.js';
import { encodeNameString } from '../../src/pki/names.js';
import { encodePem } from '../../src/pki/pem.js';
import { CertificateRecorder } from '../../src/store/certificate-recorder.js';
import type { Store } from '../../src/store/database.js';
import { forEachDialect, type StoreTarget, withDatabaseUrl } from '../helpers/db.js';
import { generateKey, opensslCsr, opensslVerify, writePems } from '../pki/fixtures.js';
import { hasCode } from '../helpers/assertions.js';

const PASSPHRASE = 'authority test passphrase';
const ORG = 'Acme Test';


function deviceCsrPem(cn: string, key: KeyObject = generateKey('ecdsa-p256').privateKey): string {
  return encodePem('CERTIFICATE REQUEST', createCsr({ subject: encodeNameString(`CN=${cn},O=${ORG}`), privateKey: key }));
}

async function counts(store: Store): Promise<{ certificates: number; audit: number; cas: number; head: string }> {
  const n = async (table: 'certificates' | 'audit_log' | 'certificate_authorities') =>
    Number((await store.db.selectFrom(table).select((eb) => eb.fn.countAll().as('n')).executeTakeFirstOrThrow()).n);
  const verdict = await verifyAuditLog(store.db);
  assert.ok(verdict.ok, JSON.stringify(verdict));
  return { certificates: await n('certificates'), audit: await n('audit_log'), cas: await n('certificate_authorities'), head: verdict.headHash };
}

function filesUnder(dir: string): string[] {
  return readdirSync(dir, { recursive: true, encoding: 'utf8' }).map((f) => join(dir, f)).filter((p) => statSync(p).isFile());
}

/** initAuthority takes its database from HALLMARK_DATABASE_URL; set it for the call only. */
async function initOn(target: StoreTarget, home: string, rootDir: string): Promise<void> {
  await withDatabaseUrl(target.url, () => initAuthority({ home, rootDir, org: ORG, passphrase: PASSPHRASE, keyBackend: 'file', actor: 'cli:test', tlsDnsNames: ['ca.test'] }));
}

forEachDialect('authority', async (t: TestContext, target: StoreTarget) => {
  const home = join(target.dir, 'home');
  const rootDir = join(target.dir, 'root');
  await initOn(target, home, rootDir);
  const authority = await Authority.open(home, PASSPHRASE, await target.openStore());
  const observer = await target.openStore(); // a second connection: sees only what was committed
  const rootPem = join(rootDir, ROOT_FILES.certificate);
  try {
    await t.test('init creates the offline root and an active issuing intermediate under it', async () => {
      const cas = await authority.listCas();
      assert.deepEqual(cas.map((c) => [c.name, c.role, c.status, c.parent]), [['root', 'root', 'active', null], ['issuing-1', 'intermediate', 'active', 'root']]);
      const issuing = cas[1]!;
      assert.equal(issuing.isDefaultIssuer, true);
      assert.equal(issuing.pathLen, 0);
      assert.equal(cas[0]!.keyLocation, 'offline (root directory)');
      const [intDer, rootDer] = await authority.caChain('issuing-1');
      assert.ok(rootDer && intDer);
      assert.equal(new NodeX509(readFileSync(rootPem)).fingerprint256, new NodeX509(rootDer).fingerprint256, 'root.pem is the root in the store');
      assert.ok(new NodeX509(intDer).verify(new NodeX509(rootDer).publicKey));
      const files = writePems(target.dir, { int: intDer });
      assert.match(opensslVerify(rootPem, undefined, files.int!, ['-x509_strict']), /: OK/);
      assert.ok(existsSync(join(home, HOME_FILES.tlsChain)));
      assert.ok(existsSync(join(rootDir, ROOT_FILES.journal)));
      const actions = (await observer.db.selectFrom('audit_log').select('action').orderBy('seq').execute()).map((r) => r.action);
      for (const a of ['authority.init', 'ca.create', 'ca.request', 'ca.install', 'certificate.issue']) assert.ok(actions.includes(a), `audit has ${a}: ${actions.join(' ')}`);
      assert.equal((await verifyAuditLog(observer.db)).ok, true);
    });

    await t.test('an issued device certificate verifies with openssl verify -CAfile root.pem -untrusted int.pem', async () => {
      for (const csr of [deviceCsrPem('device-0001'), opensslCsr('ed25519', `/CN=device-0002/O=${ORG}`), opensslCsr('rsa-2048', `/CN=device-0003/O=${ORG}`)]) {
        const issued = await authority.issue({ csr, actor: 'cli:test' });
        assert.equal(issued.profile, 'device');
        assert.equal(issued.issuer, 'issuing-1');
        assert.equal(issued.chain.length, 2);
        const files = writePems(target.dir, { int: issued.chain[0]!, leaf: issued.der });
        assert.match(opensslVerify(rootPem, files.int!, files.leaf!, ['-x509_strict', '-purpose', 'sslclient']), /leaf.pem: OK/);
      }
    });

    await t.test('an issued certificate is committed (row and certificate.issue audit entry) before issue() resolves', async () => {
      const issuingId = (await observer.db.selectFrom('certificate_authorities').select('id').where('name', '=', 'issuing-1').executeTakeFirstOrThrow()).id;
      const issued = await authority.issue({ csr: deviceCsrPem('device-0100'), actor: 'token:abc' });
      // Read at once, over another connection.
      const rows = await observer.db.selectFrom('certificates').selectAll().where('serial', '=', issued.serial).execute();
      assert.equal(rows.length, 1);
      const row = rows[0]!;
      assert.equal(Number(row.issuer_id), Number(issuingId));
      assert.ok(Buffer.from(row.der).equals(issued.der));
      assert.deepEqual([row.profile, row.status, row.requested_by, row.fingerprint_sha256, row.subject], ['device', 'valid', 'token:abc', issued.fingerprintSha256, `CN=device-0100, O=${ORG}`]);
      const audit = await observer.db.selectFrom('audit_log').selectAll().where('target', '=', issued.serial).execute();
      assert.deepEqual(audit.map((a) => [a.action, a.actor]), [['certificate.issue', 'token:abc']]);
      assert.equal(JSON.parse(audit[0]!.details).fingerprintSha256, issued.fingerprintSha256);
      assert.equal((await authority.findCertificate(issued.serial))[0]?.issuer, 'issuing-1');
    });

    await t.test('40 concurrent issuances: distinct serials, all recorded, audit chain intact', async () => {
      const before = await counts(observer);
      const issued = await Promise.all(Array.from({ length: 40 }, (_, i) => authority.issue({ csr: deviceCsrPem(`bulk-${i}`), actor: 'cli:test' })));
      assert.equal(new Set(issued.map((c) => c.serial)).size, 40);
      const after = await counts(observer);
      assert.equal(after.certificates, before.certificates + 40);
      assert.equal(after.audit, before.audit + 40);
    });

    await t.test('a bad request changes nothing (no row, no audit entry)', async () => {
      const good = deviceCsrPem('device-bad');
      const goodDer = Buffer.from(good.replace(/-----[^-]+-----|\s/g, ''), 'base64');
      const flipped = Buffer.from(goodDer);
      flipped[flipped.length - 1]! ^= 1;
      const before = await counts(observer);
      const cases: Array<[string, Parameters<Authority['issue']>[0], ErrorCode]> = [
        ['not a CSR at all', { csr: 'hello', actor: 'x' }, 'BAD_PEM'],
        ['truncated CSR', { csr: goodDer.subarray(0, goodDer.length - 20), actor: 'x' }, 'BAD_CSR'],
        ['random bytes', { csr: Buffer.concat([Buffer.from([0x30, 0x40]), randomBytes(64)]), actor: 'x' }, 'BAD_CSR'],
        ['flipped signature', { csr: encodePem('CERTIFICATE REQUEST', flipped), actor: 'x' }, 'CSR_SIGNATURE_INVALID'],
        ['oversize', { csr: Buffer.concat([Buffer.from([0x30, 0x83, 0x01, 0x00, 0x00]), Buffer.alloc(0x10000)]), actor: 'x' }, 'INPUT_TOO_LARGE'],
        ['unsupported key', { csr: opensslCsr('secp256k1', '/CN=k1'), actor: 'x' }, 'UNSUPPORTED_ALGORITHM'],
        ['unknown profile', { csr: good, profile: 'server', actor: 'x' }, 'UNKNOWN_PROFILE'],
        ['profile name from Object.prototype', { csr: good, profile: 'constructor', actor: 'x' }, 'UNKNOWN_PROFILE'],
        ['CA profile', { csr: good, profile: 'intermediate', actor: 'x' }, 'PROFILE_VIOLATION'],
        ['tls-server without SAN', { csr: good, profile: 'tls-server', actor: 'x' }, 'PROFILE_VIOLATION'],
        ['validity beyond the maximum', { csr: good, validityDays: 20 * 365 + 1, actor: 'x' }, 'PROFILE_VIOLATION'],
        ['unknown CA', { csr: good, ca: 'nope', actor: 'x' }, 'CA_NOT_FOUND'],
        ['the offline root', { csr: good, ca: 'root', actor: 'x' }, 'CA_NOT_ACTIVE'],
        ['bad subject', { csr: good, subject: 'FOO=bar', actor: 'x' }, 'BAD_REQUEST'],
      ];
      for (const [name, request, code] of cases) {
        await assert.rejects(authority.issue(request), hasCode(code), name);
      }
      assert.deepEqual(await counts(observer), before);
    });

    await t.test('a wrong passphrase -> BAD_PASSPHRASE (Authority.open and OfflineRoot.open)', async () => {
      await assert.rejects(Authority.open(home, 'not the passphrase'), hasCode('BAD_PASSPHRASE'));
      await assert.rejects(OfflineRoot.open(rootDir, 'not the passphrase'), hasCode('BAD_PASSPHRASE'));
      await assert.rejects(Authority.open(home, ''), hasCode('PASSPHRASE_REQUIRED'));
    });

    await t.test('no file under the home or root directory holds a private key in clear', async () => {
      const config = await loadHomeConfig(home);
      const issuingRef = JSON.parse((await observer.db.selectFrom('certificate_authorities').select('key_ref').where('name', '=', 'issuing-1').executeTakeFirstOrThrow()).key_ref!) as KeyRef;
      const secrets: Buffer[] = [];
      for (const ref of [config.tls.keyRef, issuingRef]) {
        const key = await authority.fileKeys.privateKeyObject(ref);
        const pkcs8 = key.export({ type: 'pkcs8', format: 'der' });
        const d = Buffer.from((key.export({ format: 'jwk' }) as { d: string }).d, 'base64url');
        secrets.push(pkcs8, Buffer.from(pkcs8.toString('base64')), d, Buffer.from(d.toString('base64')), Buffer.from(d.toString('hex')));
      }
      const files = [...filesUnder(home), ...filesUnder(rootDir), ...(target.dialect === 'sqlite' ? [target.url] : [])];
      assert.ok(files.length > 5);
      for (const file of files) {
        const content = readFileSync(file);
        assert.ok(!content.includes('PRIVATE KEY'), `${file} contains a PEM private key`);
        for (const s of secrets) assert.ok(!content.includes(s), `${file} contains private key material`);
      }
      for (const file of [...filesUnder(join(home, HOME_FILES.keys)), ...filesUnder(join(rootDir, ROOT_FILES.keys))]) {
        assert.equal(statSync(file).mode & 0o077, 0, `${file} is readable by others`);
      }
    });

    await t.test('ca request -> root sign -> ca install activates a second intermediate that issues', async () => {
      const { csrPem, path } = await authority.requestCa({ name: 'line-a', actor: 'cli:test' });
      assert.equal(readFileSync(path, 'utf8'), csrPem);
      assert.equal((await authority.listCas()).find((c) => c.name === 'line-a')?.status, 'pending');
      await assert.rejects(authority.issue({ csr: deviceCsrPem('early'), ca: 'line-a', actor: 'x' }), hasCode('CA_NOT_ACTIVE'));
      await assert.rejects(authority.requestCa({ name: 'line-a', actor: 'cli:test' }), hasCode('CA_EXISTS'));

      const root = await OfflineRoot.open(rootDir, PASSPHRASE);
      let signed: Awaited<ReturnType<OfflineRoot['signIntermediate']>>;
      try {
        signed = await root.signIntermediate({ csr: csrPem, pathLen: 0 });
        assert.ok((await root.journal()).some((e) => e.serial === signed.serial && e.profile === 'intermediate'));
      } finally {
        await root.close();
      }
      const info = await authority.installCa({ certificate: encodePem('CERTIFICATE', signed.der), actor: 'cli:test' });
      assert.deepEqual([info.name, info.status, info.parent, info.isDefaultIssuer], ['line-a', 'active', 'root', false]);

      const issued = await authority.issue({ csr: deviceCsrPem('line-a-device'), ca: 'line-a', actor: 'cli:test' });
      assert.equal(issued.issuer, 'line-a');
      assert.ok(issued.chain[0]!.equals(signed.der));
      const [issuing1] = await authority.caChain('issuing-1', false);
      const files = writePems(target.dir, { linea: signed.der, issuing1: issuing1!, leaf: issued.der });
      assert.match(opensslVerify(rootPem, files.linea!, files.leaf!, ['-x509_strict', '-purpose', 'sslclient']), /: OK/);
      assert.throws(() => opensslVerify(rootPem, files.issuing1!, files.leaf!), /unable to get local issuer certificate/);
      const record = await authority.findCertificate(signed.serial);
      assert.deepEqual(record.map((r) => [r.issuer, r.profile]), [['root', 'intermediate']]);
      const audit = await observer.db.selectFrom('audit_log').select(['action']).where('target', '=', 'line-a').orderBy('seq').execute();
      assert.deepEqual(audit.map((a) => a.action), ['ca.request', 'ca.install']);
    });

    await t.test('installing a certificate that matches no pending request, or does not chain to the root -> CA_CERT_MISMATCH', async () => {
      const [issuing1] = await authority.caChain('issuing-1', false);
      const [lineA] = await authority.caChain('line-a', false);
      const leaf = await authority.issue({ csr: deviceCsrPem('not-a-ca'), actor: 'cli:test' });
      const { csrPem } = await authority.requestCa({ name: 'line-b', actor: 'cli:test' });
      const foreign = await OfflineRoot.create({ dir: join(target.dir, 'foreign-root'), passphrase: PASSPHRASE, org: 'Someone Else', algorithm: 'ecdsa-p256' });
      let foreignSigned: Buffer;
      try {
        foreignSigned = (await foreign.signIntermediate({ csr: csrPem })).der;
      } finally {
        await foreign.close();
      }
      const before = await counts(observer);
      for (const [name, der] of [['an already active CA', issuing1!], ['a CA installed before', lineA!], ['a device certificate', leaf.der], ['signed by another root', foreignSigned]] as const) {
        await assert.rejects(authority.installCa({ certificate: der, actor: 'cli:test' }), hasCode('CA_CERT_MISMATCH'), name);
      }
      await assert.rejects(authority.installCa({ certificate: 'garbage', actor: 'cli:test' }), hasCode('BAD_PEM'));
      assert.deepEqual(await counts(observer), before);
      assert.equal((await authority.listCas()).find((c) => c.name === 'line-b')?.status, 'pending');
    });

    await t.test('the store refuses a second certificate with the same (issuer, serial)', async () => {
      const issued = await authority.issue({ csr: deviceCsrPem('dup'), actor: 'cli:test' });
      const row = await observer.db.selectFrom('certificates').selectAll().where('serial', '=', issued.serial).executeTakeFirstOrThrow();
      const { id: _id, ...copy } = row;
      await assert.rejects(authority.store.db.insertInto('certificates').values({ ...copy, fingerprint_sha256: 'other' }).execute(), (err) => {
        const code = (err as { code?: string }).code;
        assert.ok(code === '23505' || code === 'SQLITE_CONSTRAINT_UNIQUE', `unique violation expected, got ${String(err)}`);
        return true;
      });
      const recorder = new CertificateRecorder(authority.store);
      await assert.rejects(recorder.record(copy, { actor: 'x', action: 'certificate.issue', target: copy.serial }), hasCode('SERIAL_COLLISION'));
      // The same serial under another issuer is a different certificate.
      const lineAId = (await observer.db.selectFrom('certificate_authorities').select('id').where('name', '=', 'line-a').executeTakeFirstOrThrow()).id;
      await recorder.record({ ...copy, issuer_id: lineAId }, { actor: 'x', action: 'certificate.issue', target: copy.serial });
      assert.equal((await observer.db.selectFrom('certificates').select('id').where('serial', '=', issued.serial).execute()).length, 2);
    });
  } finally {
    await authority.close();
  }
}, { timeout: 180_000 });
