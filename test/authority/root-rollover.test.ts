// Root rollover (RFC 4210 §4.4 / RFC 7030 §4.1.3) and the root ceremony that revokes an intermediate:
// offline (OfflineRoot.rollover / revokeIntermediate / issueCrl) and online (installRootRollover,
// installRootCrl, CaDirectory, EST cacerts). On SQLite and PostgreSQL.

import assert from 'node:assert/strict';
import { createHash, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { verifyAuditLog } from '../../src/audit/audit-log.js';
import { Authority } from '../../src/authority/authority.js';
import { initAuthority } from '../../src/authority/init.js';
import { OfflineRoot, parseValidity, successorSubject } from '../../src/authority/offline-root.js';
import { installRootCrl, installRootRollover } from '../../src/authority/root-rollover.js';
import { HallmarkError, type ErrorCode } from '../../src/errors.js';
import { parseCertificate } from '../../src/pki/certificate.js';
import { createCsr } from '../../src/pki/csr.js';
import { encodeNameString, nameToString } from '../../src/pki/names.js';
import { decodeOne, encodePem, SIZE_LIMITS } from '../../src/pki/pem.js';
import { verifyIssuedBy } from '../../src/pki/verify.js';
import { parseCrl, verifyCrlSignature } from '../../src/protocols/crl/crl.js';
import { caCertificates } from '../../src/protocols/est/routes.js';
import { decodeCertsOnly, encodeCertsOnly } from '../../src/protocols/est/wire.js';
import { forEachDialect, type StoreTarget, withDatabaseUrl } from '../helpers/db.js';
import { hasCode } from '../helpers/assertions.js';

const PASSPHRASE = 'root rollover test passphrase';
const ACTOR = 'cli:test';


interface DeviceKey { readonly privateKey: KeyObject; readonly spki: Buffer; readonly udid: string }
function newKey(): DeviceKey {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const spki = publicKey.export({ type: 'spki', format: 'der' });
  return { privateKey, spki, udid: createHash('sha256').update(spki).digest('hex') };
}
const csrOf = (key: DeviceKey): string => encodePem('CERTIFICATE REQUEST', createCsr({ subject: encodeNameString('CN=x'), privateKey: key.privateKey }));
const pemCert = (path: string) => parseCertificate(decodeOne(readFileSync(path), ['CERTIFICATE'], SIZE_LIMITS.certificate));

// Whether Authority.installCa already asks the directory which root signed the certificate (see the report).

test('successor subjects and validities', () => {
  assert.equal(nameToString(successorSubject(encodeNameString('CN=Acme Root CA,O=Acme'), 2)), 'CN=Acme Root CA 2, O=Acme');
  assert.equal(nameToString(successorSubject(encodeNameString('CN=Acme Root CA 2,O=Acme'), 3)), 'CN=Acme Root CA 3, O=Acme');
  assert.equal(nameToString(successorSubject(encodeNameString('O=Acme'), 2)), 'O=Acme, CN=Root CA 2');
  assert.equal(parseValidity('20y'), 7300);
  assert.equal(parseValidity('90d'), 90);
  assert.equal(parseValidity('30'), 30);
  assert.throws(() => parseValidity('ten years'), hasCode('BAD_REQUEST'));
});

forEachDialect('root rollover and root revocation', async (t: TestContext, target: StoreTarget) => {
  const home = join(target.dir, 'home');
  const rootDir = join(target.dir, 'root');
  await withDatabaseUrl(target.url, () => initAuthority({ home, rootDir, org: 'Acme', passphrase: PASSPHRASE, keyBackend: 'file', actor: ACTOR }));
  const authority = await Authority.open(home, PASSPHRASE, await target.openStore());
  const registry = authority.registry;
  let root: OfflineRoot | undefined = await OfflineRoot.open(rootDir, PASSPHRASE);
  const oldRootDer = root.certificateDer;
  const oldRoot = parseCertificate(oldRootDer);
  try {
    // A fleet on issuing-1 (signed by the first root) before the rollover.
    await registry.createProduct({ name: 'meter', actor: ACTOR });
    await registry.createLine({ name: 'line-1', ca: 'issuing-1', actor: ACTOR });
    const batch = await registry.createBatch({ product: 'meter', line: 'line-1', quota: 10, actor: ACTOR });
    const keys = [newKey(), newKey()];
    await registry.registerDevices(batch, keys.map((k) => ({ publicKeySpki: k.spki })), ACTOR);
    const deviceSerials: string[] = [];
    for (const k of keys) deviceSerials.push((await authority.issueForDevice({ udid: k.udid, csr: csrOf(k), actor: ACTOR })).serial);
    // An intermediate signed by the old root before the rollover, installed after it.
    const { csrPem: lateCsr } = await authority.requestCa({ name: 'line-late', actor: ACTOR });
    const late = await root.signIntermediate({ csr: lateCsr });

    let rollover!: Awaited<ReturnType<OfflineRoot['rollover']>>;
    await t.test('rollover: a new root key and certificate, NewWithOld and OldWithNew, journaled; the old root stays', async () => {
      rollover = await root!.rollover();
      const { current, previous } = rollover;
      assert.equal(current.name, 'root-2');
      assert.equal(current.subject, 'CN=Acme Root CA 2, O=Acme');
      assert.equal(previous.name, 'root');
      const newRoot = parseCertificate(current.der);
      const nwo = parseCertificate(rollover.newWithOld);
      const own = parseCertificate(rollover.oldWithNew);
      verifyIssuedBy(newRoot, newRoot);
      verifyIssuedBy(nwo, oldRoot);
      verifyIssuedBy(own, newRoot);
      assert.ok(nwo.subjectPublicKeyInfo.equals(newRoot.subjectPublicKeyInfo) && nwo.subject.equals(newRoot.subject));
      assert.ok(own.subjectPublicKeyInfo.equals(oldRoot.subjectPublicKeyInfo) && own.subject.equals(oldRoot.subject));
      assert.ok(own.notAfter <= oldRoot.notAfter && nwo.notAfter <= oldRoot.notAfter);
      assert.ok(!newRoot.subjectPublicKeyInfo.equals(oldRoot.subjectPublicKeyInfo));
      // Files in the root directory; root.pem is the new root; root.json knows both generations.
      for (const f of Object.values(rollover.files)) assert.ok(existsSync(join(rootDir, f)), f);
      assert.ok(pemCert(join(rootDir, 'root.pem')).der.equals(current.der));
      assert.ok(pemCert(join(rootDir, 'root-1.pem')).der.equals(oldRootDer));
      const config = JSON.parse(readFileSync(join(rootDir, 'root.json'), 'utf8'));
      assert.equal(config.name, 'root-2');
      assert.equal(config.generation, 2);
      assert.deepEqual(config.previous.map((p: { name: string }) => p.name), ['root']);
      const kinds = (await root!.journal()).filter((e) => e.profile === 'root').map((e) => `${e.kind}:${e.issuer}`);
      assert.deepEqual(kinds, ['newwithnew:root', 'newwithnew:root-2', 'newwithold:root', 'oldwithnew:root-2']);
      // Re-opened, the directory signs with the new root.
      await root!.close();
      root = await OfflineRoot.open(rootDir, PASSPHRASE);
      assert.equal(root.name, 'root-2');
      assert.deepEqual((await root.generations()).map((g) => g.name), ['root', 'root-2']);
    });

    await t.test('a second rollover of the same generation subject is refused; rollover keeps the old key usable', async () => {
      await assert.rejects(root!.rollover({ subject: 'CN=Acme Root CA,O=Acme' }), hasCode('BAD_REQUEST'));
      const crl = await root!.issueCrl('root');
      assert.ok(verifyCrlSignature(parseCrl(crl.der), oldRoot.subjectPublicKeyInfo));
      assert.equal(parseCrl(crl.der).entries.length, 0);
    });

    await t.test('install-rollover: the new root becomes the current root, the links are recorded, audited; idempotent', async () => {
      const r = await installRootRollover({ store: authority.store, home, from: rootDir, actor: ACTOR });
      assert.equal(r.name, 'root-2');
      assert.equal(r.previous, 'root');
      assert.equal(r.alreadyInstalled, false);
      const cas = await authority.listCas();
      assert.deepEqual(cas.filter((c) => c.role === 'root').map((c) => `${c.name}:${c.status}`), ['root:active', 'root-2:active']);
      assert.equal(await authority.rootName(), 'root-2');
      const links = await authority.store.db.selectFrom('certificates').innerJoin('certificate_authorities as ca', 'ca.id', 'certificates.issuer_id').select(['ca.name', 'certificates.der']).where('certificates.profile', '=', 'root').orderBy('certificates.id').execute();
      assert.deepEqual(links.map((l) => l.name), ['root', 'root-2']);
      assert.ok(Buffer.from(links[0]!.der).equals(rollover.newWithOld));
      assert.ok(Buffer.from(links[1]!.der).equals(rollover.oldWithNew));
      const audit = await authority.store.db.selectFrom('audit_log').select(['target', 'details']).where('action', '=', 'ca.rollover').execute();
      assert.equal(audit.length, 1);
      assert.equal(audit[0]!.target, 'root-2');
      assert.ok(existsSync(join(home, 'rollover', 'root-2-oldwithnew.pem')));
      assert.equal((await installRootRollover({ store: authority.store, home, from: rootDir, actor: ACTOR })).alreadyInstalled, true);
      assert.equal((await authority.store.db.selectFrom('certificates').select('id').where('profile', '=', 'root').execute()).length, 2);
    });

    await t.test('install-rollover refuses link certificates that do not chain to an active root', async () => {
      const { mkdtemp, writeFile } = await import('node:fs/promises');
      const bad = await mkdtemp(join(target.dir, 'bad-'));
      // NewWithOld and OldWithNew swapped: neither certifies what its name says.
      await writeFile(join(bad, 'root-3.pem'), encodePem('CERTIFICATE', rollover.current.der));
      await writeFile(join(bad, 'root-3-newwithold.pem'), encodePem('CERTIFICATE', rollover.oldWithNew));
      await writeFile(join(bad, 'root-3-oldwithnew.pem'), encodePem('CERTIFICATE', rollover.newWithOld));
      await assert.rejects(installRootRollover({ store: authority.store, home, from: bad, actor: ACTOR }), hasCode('CA_CERT_MISMATCH'));
      await assert.rejects(installRootRollover({ store: authority.store, home, from: join(target.dir, 'home'), actor: ACTOR }), hasCode('BAD_REQUEST'));
    });

    await t.test('EST cacerts: issuing CAs, then NewWithNew, NewWithOld, OldWithNew, OldWithOld (RFC 7030 §4.1.3)', async () => {
      const certs = decodeCertsOnly(encodeCertsOnly(await caCertificates(authority, undefined)));
      const tail = certs.slice(-4);
      assert.ok(tail[0]!.equals(rollover.current.der), 'NewWithNew');
      assert.ok(tail[1]!.equals(rollover.newWithOld), 'NewWithOld');
      assert.ok(tail[2]!.equals(rollover.oldWithNew), 'OldWithNew');
      assert.ok(tail[3]!.equals(oldRootDer), 'OldWithOld');
      assert.deepEqual(certs.slice(0, -4).map((c) => nameToString(parseCertificate(c).subject)), ['CN=Acme issuing-1, O=Acme']);
      // A line label: the line's chain, plus the rollover certificates it does not already hold.
      const line = await caCertificates(authority, 'line-1');
      assert.equal(line.length, 5);
      assert.equal(nameToString(parseCertificate(line[0]!).subject), 'CN=Acme issuing-1, O=Acme');
      assert.equal(line.filter((c) => c.equals(oldRootDer)).length, 1);
    });

    await t.test('intermediates signed after the rollover come from the new root and chain to it', async () => {
      const { csrPem } = await authority.requestCa({ name: 'line-new', actor: ACTOR });
      const signed = await root!.signIntermediate({ csr: csrPem });
      const cert = parseCertificate(signed.der);
      verifyIssuedBy(cert, parseCertificate(rollover.current.der));
      assert.equal(await authority.directory.issuingRootOf(cert), 'root-2');
      const ca = await authority.installCa({ certificate: signed.der, actor: ACTOR });
      assert.equal(ca.parent, 'root-2');
      const chain = await authority.caChain('line-new');
      assert.ok(chain[1]!.equals(rollover.current.der));
      assert.equal((await root!.journal()).find((e) => e.serial === signed.serial)!.issuer, 'root-2');
    });

    await t.test('the directory finds the root that signed an intermediate, old or new', async () => {
      assert.equal(await authority.directory.issuingRootOf(late.der), 'root');
      const [issuing1] = await authority.caChain('issuing-1', false);
      assert.equal(await authority.directory.issuingRootOf(issuing1!), 'root');
      assert.equal(await authority.directory.issuingRootOf(rollover.newWithOld), 'root');
      assert.equal(await authority.directory.issuingRootOf(rollover.oldWithNew), 'root-2');
      const [device] = await authority.findCertificate(deviceSerials[0]!);
      await assert.rejects(authority.directory.issuingRootOf(device!.der), hasCode('CA_CERT_MISMATCH'));
    });

    await t.test('ca install accepts an intermediate signed by the old root during the rollover', async () => {
      const ca = await authority.installCa({ certificate: late.der, actor: ACTOR });
      assert.equal(ca.parent, 'root');
      assert.equal(ca.status, 'active');
    });

    let crlDer!: Buffer;
    await t.test('root revoke: the old root revokes issuing-1 by name; a fresh CRL lists it with its reason', async () => {
      const r = await root!.revokeIntermediate({ ca: 'issuing-1' });
      assert.equal(r.issuer, 'root');
      assert.equal(r.reason, 'cACompromise');
      assert.equal(r.subject, 'CN=Acme issuing-1, O=Acme');
      assert.equal(r.crl.number, 2); // #1 was the empty CRL above
      crlDer = r.crl.der;
      assert.ok(readFileSync(join(rootDir, 'root.crl')).equals(crlDer));
      assert.match(readFileSync(join(rootDir, 'root.crl.pem'), 'utf8'), /-----BEGIN X509 CRL-----/);
      const crl = parseCrl(crlDer);
      assert.ok(crl.issuer.equals(oldRoot.subject));
      assert.ok(verifyCrlSignature(crl, oldRoot.subjectPublicKeyInfo));
      assert.equal(crl.number, 2);
      const [issuing1] = await authority.caChain('issuing-1', false);
      assert.deepEqual(crl.entries.map((e) => [e.serialHex, e.reason]), [[parseCertificate(issuing1!).serialHex.replace(/^00/, ''), 'cACompromise']]);
      const days = (crl.nextUpdate!.getTime() - crl.thisUpdate.getTime()) / 86_400_000;
      assert.equal(days, 30);
      assert.deepEqual((await root!.revocations()).map((e) => e.issuer), ['root']);
      await assert.rejects(root!.revokeIntermediate({ ca: 'issuing-1' }), hasCode('ILLEGAL_TRANSITION'));
      await assert.rejects(root!.revokeIntermediate({ serial: 'abcdef' }), hasCode('CERTIFICATE_NOT_FOUND'));
      await assert.rejects(root!.revokeIntermediate({ ca: 'line-new', reason: 'certificateHold' }), hasCode('BAD_REQUEST'));
    });

    await t.test('install-crl: issuing-1 revoked, everything it issued revoked (cACompromise), its devices marked for re-enrolment', async () => {
      const before = await Promise.all(keys.map((k) => registry.device(k.udid)));
      const r = await installRootCrl(authority, { crl: crlDer, actor: ACTOR });
      assert.equal(r.root, 'root');
      assert.equal(r.number, 2);
      assert.equal(r.path, join(home, 'crl', 'root.crl'));
      assert.ok(readFileSync(r.path).equals(crlDer));
      assert.equal(r.revoked.length, 1);
      const [rev] = r.revoked;
      assert.equal(rev!.name, 'issuing-1');
      assert.equal(rev!.newlyRevoked, true);
      assert.ok(rev!.certificatesRevoked >= 2);
      assert.deepEqual([...rev!.devices].sort(), keys.map((k) => k.udid).sort());
      assert.deepEqual(rev!.lines, ['line-1']);
      assert.equal((await authority.directory.caRow('issuing-1')).status, 'revoked');
      for (const serial of deviceSerials) {
        const [c] = await authority.findCertificate(serial);
        assert.equal(c!.status, 'revoked');
        const row = await authority.store.db.selectFrom('certificates').select('revocation_reason').where('serial', '=', serial).executeTakeFirstOrThrow();
        assert.equal(row.revocation_reason, 'cACompromise');
      }
      const own = await authority.store.db.selectFrom('certificates').select(['status', 'revocation_reason']).where('profile', '=', 'intermediate').where('subject', '=', 'CN=Acme issuing-1, O=Acme').executeTakeFirstOrThrow();
      assert.deepEqual(own, { status: 'revoked', revocation_reason: 'cACompromise' });
      // Devices keep their state; the re-enrolment mark is in the audit log.
      const after = await Promise.all(keys.map((k) => registry.device(k.udid)));
      assert.deepEqual(after.map((d) => d.state), before.map((d) => d.state));
      const marks = await authority.store.db.selectFrom('audit_log').select('target').where('action', '=', 'device.reenrolment-required').execute();
      assert.deepEqual(marks.map((m) => m.target).sort(), keys.map((k) => k.udid).sort());
      const crls = await authority.store.db.selectFrom('crls').innerJoin('certificate_authorities as ca', 'ca.id', 'crls.ca_id').select(['ca.name', 'crls.number', 'crls.kind']).execute();
      assert.deepEqual(crls.map((c) => [c.name, Number(c.number), c.kind]), [['root', 2, 'full']]);
      // The revoked CA issues nothing more (in a process that opens the authority afresh: an open Authority
      // keeps the issuers it has loaded, so a running serve must be restarted).
      const fresh = await Authority.open(home, PASSPHRASE, await target.openStore());
      try {
        await assert.rejects(fresh.issue({ csr: csrOf(newKey()), ca: 'issuing-1', subject: 'CN=y', actor: ACTOR }), hasCode('CA_NOT_ACTIVE'));
      } finally {
        await fresh.close();
      }
      // Other CAs are untouched.
      assert.equal((await authority.directory.caRow('line-new')).status, 'active');
      // Again: nothing new to do, no error.
      const again = await installRootCrl(authority, { crl: crlDer, actor: ACTOR });
      assert.equal(again.revoked[0]!.newlyRevoked, false);
      assert.equal(again.revoked[0]!.certificatesRevoked, 0);
      assert.equal((await verifyAuditLog(authority.store.db)).ok, true);
    });

    await t.test('install-crl refuses an older CRL, a CRL of another issuer and a tampered CRL', async () => {
      const older = readFileSync(join(rootDir, 'root.crl')); // still #2; make #3, install it, then #2 is older
      const fresh = await root!.issueCrl('root');
      assert.equal(fresh.number, 3);
      await installRootCrl(authority, { crl: fresh.der, actor: ACTOR });
      await assert.rejects(installRootCrl(authority, { crl: older, actor: ACTOR }), hasCode('BAD_REQUEST'));
      const tampered = Buffer.from(fresh.der);
      tampered[tampered.length - 5] ^= 0x01;
      await assert.rejects(installRootCrl(authority, { crl: tampered, actor: ACTOR }), hasCode('CA_CERT_MISMATCH'));
      const expired = await root!.issueCrl('root', { days: 1, now: new Date(Date.now() - 3 * 86_400_000) });
      await assert.rejects(installRootCrl(authority, { crl: expired.der, actor: ACTOR }), hasCode('BAD_REQUEST'));
    });

    await t.test('root revoke by serial of a new-root intermediate: the CRL of root-2, installed as crl/root-2.crl', async () => {
      const row = await authority.directory.caRow('line-new');
      const r = await root!.revokeIntermediate({ serial: row.serial!, reason: 'superseded' });
      assert.equal(r.issuer, 'root-2');
      assert.equal(r.crl.number, 1);
      assert.ok(verifyCrlSignature(parseCrl(r.crl.der), parseCertificate(rollover.current.der).subjectPublicKeyInfo));
      const installed = await installRootCrl(authority, { crl: encodePem('X509 CRL', r.crl.der), actor: ACTOR });
      assert.equal(installed.root, 'root-2');
      assert.equal(installed.path, join(home, 'crl', 'root-2.crl'));
      assert.equal((await authority.directory.caRow('line-new')).status, 'revoked');
      assert.equal(installed.revoked[0]!.reason, 'superseded');
    });
  } finally {
    await root?.close();
    await authority.close();
  }
});
