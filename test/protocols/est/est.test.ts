// EST (RFC 7030) against a running server: every authenticator, the registry gates, and bad input.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createPrivateKey, createPublicKey, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { Authority } from '../../../src/authority/authority.js';
import { createClaim } from '../../../src/enrollment/claims.js';
import { createLogger } from '../../../src/log.js';
import { parseCertificate } from '../../../src/pki/certificate.js';
import { OID_CHALLENGE_PASSWORD, createCsr } from '../../../src/pki/csr.js';
import { oid, seq, set } from '../../../src/pki/der.js';
import { encodeNameString, nameToString } from '../../../src/pki/names.js';
import { encodePem } from '../../../src/pki/pem.js';
import { clientChannelBinding, decodeCertsOnly, decodeCsrAttrs, parseServerKeygenResponse } from '../../../src/protocols/est/wire.js';
import { addVendorCa } from '../../../src/registry/birth-certificates.js';
import { udidOfKey } from '../../../src/registry/registry.js';
import { startServers, type RunningServers } from '../../../src/server/servers.js';
import { createTestAuthority, type TestAuthority } from '../../helpers/authority.js';
import { call, type Reply } from '../../helpers/http.js';

interface DeviceKey { privateKey: KeyObject; spki: Buffer; udid: string; pem: string }

function newKey(curve = 'P-256'): DeviceKey {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: curve });
  const spki = publicKey.export({ type: 'spki', format: 'der' });
  return { privateKey, spki, udid: udidOfKey(spki), pem: privateKey.export({ type: 'pkcs8', format: 'pem' }) as string };
}

function challengePasswordAttribute(text: string): Buffer {
  const utf8 = Buffer.from(text, 'utf8');
  return seq(oid(OID_CHALLENGE_PASSWORD), set(Buffer.concat([Buffer.from([0x0c, utf8.length]), utf8])));
}

function csrB64(key: DeviceKey, options: { cn?: string; challengePassword?: string } = {}): string {
  const der = createCsr({ subject: encodeNameString(`CN=${options.cn ?? 'whatever the device asks'}`), privateKey: key.privateKey, attributes: options.challengePassword ? [challengePasswordAttribute(options.challengePassword)] : [] });
  return der.toString('base64').replace(/.{64}/g, '$&\r\n');
}

const PKCS10 = { 'content-type': 'application/pkcs10' };

describe('EST server', () => {
  let t: TestAuthority;
  let authority: Authority;
  let servers: RunningServers;
  let est: string;
  let ca: string;
  let logLines: string[];

  const enroll = (body: string | Buffer, options: { path?: string; claim?: string; cert?: string; key?: string; headers?: Record<string, string> } = {}): Promise<Reply> =>
    call(`${est}/${options.path ?? 'simpleenroll'}`, {
      method: 'POST', rawBody: body, ca, cert: options.cert, key: options.key,
      headers: { ...PKCS10, ...(options.claim ? { authorization: `Basic ${Buffer.from(options.claim).toString('base64')}` } : {}), ...options.headers },
    });
  const issuedCert = (r: Reply): Buffer => {
    assert.equal(r.status, 200, r.body);
    assert.match(String(r.headers['content-type']), /^application\/pkcs7-mime; smime-type=certs-only/);
    const certs = decodeCertsOnly(Buffer.from(r.body, 'base64'));
    assert.equal(certs.length, 1);
    return certs[0]!;
  };
  const codeOf = (r: Reply): string => r.body.split(':')[0]!;
  const auditActions = async (): Promise<{ action: string; target: string; details: string }[]> =>
    authority.store.db.selectFrom('audit_log').select(['action', 'target', 'details']).orderBy('seq').execute();

  before(async () => {
    t = await createTestAuthority();
    authority = await Authority.open(t.home, t.passphrase);
    logLines = [];
    const sink = { write: (line: string) => { logLines.push(line); return true; } } as unknown as NodeJS.WritableStream;
    servers = await startServers(authority, { host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger: createLogger(sink), requestTimeoutMs: 1500 });
    est = `${servers.httpsUrl}/.well-known/est`;
    ca = readFileSync(t.rootPem, 'utf8');
    const r = authority.registry;
    await r.createProduct({ name: 'sensor', actor: 'test' });
    await r.createProduct({ name: 'rekeyable', allowRekey: true, actor: 'test' });
    await r.createProduct({ name: 'keyless', allowServerKeygen: true, allowRekey: true, actor: 'test' });
    await r.createLine({ name: 'line-a', ca: 'issuing-1', actor: 'test' });
  });

  after(async () => {
    await servers?.close();
    await authority?.close();
    await t?.cleanup();
  });

  const batch = (product: string, quota: number, allowUnregistered = false): Promise<string> =>
    authority.registry.createBatch({ product, line: 'line-a', quota, allowUnregistered, actor: 'test' });

  test('cacerts: a certs-only CMS of the issuing CA and the root, readable by openssl pkcs7', async () => {
    const r = await call(`${est}/cacerts`, { ca });
    assert.equal(r.status, 200);
    assert.match(String(r.headers['content-type']), /^application\/pkcs7-mime; smime-type=certs-only/);
    assert.equal(r.headers['content-transfer-encoding'], 'base64');
    const certs = decodeCertsOnly(Buffer.from(r.body, 'base64'));
    const subjects = certs.map((c) => nameToString(parseCertificate(c).subject));
    assert.ok(subjects.some((s) => /Root/.test(s)), subjects.join(' | '));
    assert.ok(certs.length >= 2);
    const file = join(t.dir, 'cacerts.p7b');
    writeFileSync(file, Buffer.from(r.body, 'base64'));
    const printed = execFileSync('openssl', ['pkcs7', '-inform', 'DER', '-in', file, '-print_certs'], { encoding: 'utf8' });
    assert.equal((printed.match(/BEGIN CERTIFICATE/g) ?? []).length, certs.length);
    // A line label narrows it to that line's chain.
    const l = await call(`${est}/line-a/cacerts`, { ca });
    assert.equal(decodeCertsOnly(Buffer.from(l.body, 'base64')).length, 2);
  });

  test('csrattrs: asks for challengePassword and a P-256 key signed with ECDSA-SHA256', async () => {
    const r = await call(`${est}/csrattrs`, { ca });
    assert.equal(r.status, 200);
    assert.match(String(r.headers['content-type']), /^application\/csrattrs/);
    const attrs = decodeCsrAttrs(Buffer.from(r.body, 'base64'));
    assert.ok(attrs.some((a) => 'oid' in a && a.oid === OID_CHALLENGE_PASSWORD));
    assert.ok(attrs.some((a) => 'attribute' in a && a.attribute === '1.2.840.10045.2.1'));
  });

  test('registered key: a CSR signed by a registered hardware key enrols; subject and SAN come from the registry', async () => {
    const b = await batch('sensor', 5);
    const key = newKey();
    await authority.registry.registerDevice(b, { publicKeySpki: key.spki, serialNumber: 'SN-0001' }, 'test');
    const cert = parseCertificate(issuedCert(await enroll(csrB64(key, { cn: 'evil.example.com' }))));
    const subject = nameToString(cert.subject);
    assert.match(subject, new RegExp(`CN=${key.udid}`));
    assert.match(subject, /serialNumber=SN-0001/i);
    assert.doesNotMatch(subject, /evil/);
    assert.ok(cert.subjectPublicKeyInfo.equals(key.spki));
    const device = await authority.registry.device(key.udid);
    assert.equal(device.state, 'provisioned');
    assert.equal((await authority.registry.batch(b)).issued, 1);
    const issue = (await auditActions()).filter((a) => a.action === 'certificate.issue').pop()!;
    assert.equal(JSON.parse(issue.details).authenticator, 'registered-key');
  });

  test('no credential and an unknown key: 401 with WWW-Authenticate, refusal audited, nothing issued', async () => {
    const before = (await authority.store.db.selectFrom('certificates').select('id').execute()).length;
    const r = await enroll(csrB64(newKey()));
    assert.equal(r.status, 401);
    assert.match(String(r.headers['www-authenticate']), /^Basic realm="hallmark-est"/);
    assert.equal(codeOf(r), 'EST_CREDENTIALS_REQUIRED');
    assert.equal((await authority.store.db.selectFrom('certificates').select('id').execute()).length, before);
    assert.equal((await auditActions()).pop()!.action, 'enrolment.refused');
  });

  test('claim: registers an unregistered key on first use in a batch that allows it; each device once; uses counted', async () => {
    const b = await batch('sensor', 10, true);
    const claim = await createClaim(authority.store, { batch: b, uses: 2, ttlMs: 3600e3, actor: 'test' });
    const a = newKey();
    issuedCert(await enroll(csrB64(a), { claim: claim.basic }));
    const device = await authority.registry.device(a.udid);
    assert.equal(device.batch, b);
    // The same device cannot use the claim a second time; the use is not spent.
    const again = await enroll(csrB64(a), { claim: claim.basic });
    assert.equal(again.status, 403);
    assert.equal(codeOf(again), 'CLAIM_ALREADY_USED');
    issuedCert(await enroll(csrB64(newKey()), { claim: claim.basic }));
    // Used up: a third device is refused.
    const third = await enroll(csrB64(newKey()), { claim: claim.basic });
    assert.equal(third.status, 401);
    assert.equal(codeOf(third), 'CLAIM_INVALID');
    const row = await authority.store.db.selectFrom('claims').selectAll().where('id', '=', claim.id).executeTakeFirstOrThrow();
    assert.equal(Number(row.used), 2);
    const actions = (await auditActions()).map((x) => x.action);
    assert.equal(actions.filter((x) => x === 'claim.use').length, 2);
    assert.ok(actions.includes('claim.refused'));
  });

  test('claim: a wrong secret, an expired or a revoked claim is refused with 401 and audited; the secret never reaches the log', async () => {
    const b = await batch('sensor', 10, true);
    const claim = await createClaim(authority.store, { batch: b, uses: 5, ttlMs: 3600e3, actor: 'test' });
    const wrong = await enroll(csrB64(newKey()), { claim: `${claim.id}:not-the-secret` });
    assert.equal(wrong.status, 401);
    assert.equal(codeOf(wrong), 'CLAIM_INVALID');
    const refused = (await auditActions()).filter((a) => a.action === 'claim.refused').pop()!;
    assert.equal(refused.target, claim.id);
    assert.match(refused.details, /wrong secret/);
    await authority.store.db.updateTable('claims').set({ expires_at: new Date(Date.now() - 1000).toISOString() }).where('id', '=', claim.id).execute();
    const expired = await enroll(csrB64(newKey()), { claim: claim.basic });
    assert.equal(expired.status, 401);
    assert.ok(!logLines.join('').includes(claim.secret));
    assert.ok(!(await auditActions()).some((a) => a.details.includes(claim.secret)));
  });

  test('claim: a key registered in another batch, or unregistered in a batch that does not allow it, is refused', async () => {
    const b1 = await batch('sensor', 10);
    const b2 = await batch('sensor', 10);
    const claim = await createClaim(authority.store, { batch: b2, uses: 5, ttlMs: 3600e3, actor: 'test' });
    const other = newKey();
    await authority.registry.registerDevice(b1, { publicKeySpki: other.spki }, 'test');
    const r = await enroll(csrB64(other), { claim: claim.basic });
    assert.equal(r.status, 403);
    assert.equal(codeOf(r), 'ENROLMENT_REFUSED');
    const unregistered = await enroll(csrB64(newKey()), { claim: claim.basic });
    assert.equal(unregistered.status, 403);
    assert.match(unregistered.body, /does not accept unregistered keys/);
  });

  test('quota: the batch quota stops the (quota+1)-th device (overproduction), audited', async () => {
    const b = await batch('sensor', 1, true);
    const claim = await createClaim(authority.store, { batch: b, uses: 5, ttlMs: 3600e3, actor: 'test' });
    issuedCert(await enroll(csrB64(newKey()), { claim: claim.basic }));
    const over = await enroll(csrB64(newKey()), { claim: claim.basic });
    assert.equal(over.status, 409);
    assert.equal(codeOf(over), 'QUOTA_EXCEEDED');
    assert.ok((await auditActions()).some((a) => a.action === 'issuance.quota_exceeded'));
    // The refused enrolment did not spend a claim use.
    const row = await authority.store.db.selectFrom('claims').select('used').where('id', '=', claim.id).executeTakeFirstOrThrow();
    assert.equal(Number(row.used), 1);
  });

  test('concurrent enrolments racing for a quota of 5: exactly 5 certificates, 5 claim uses, 5 registrations; the audit chain holds', async () => {
    const b = await batch('sensor', 5, true);
    const claim = await createClaim(authority.store, { batch: b, uses: 100, ttlMs: 3600e3, actor: 'test' });
    const replies = await Promise.all(Array.from({ length: 20 }, () => enroll(csrB64(newKey()), { claim: claim.basic })));
    const statuses = replies.map((r) => r.status).sort();
    assert.equal(statuses.filter((x) => x === 200).length, 5, statuses.join(','));
    assert.ok(replies.filter((r) => r.status !== 200).every((r) => r.status === 409 && codeOf(r) === 'QUOTA_EXCEEDED'));
    assert.equal((await authority.registry.batch(b)).issued, 5);
    assert.equal((await authority.registry.listDevices({ batch: b })).items.length, 5, 'refused enrolments leave no registration');
    const row = await authority.store.db.selectFrom('claims').select('used').where('id', '=', claim.id).executeTakeFirstOrThrow();
    assert.equal(Number(row.used), 5);
    const { verifyAuditLog } = await import('../../../src/audit/audit-log.js');
    assert.equal((await verifyAuditLog(authority.store.db)).ok, true);
  });

  test('a batch that requires approval: 202 + Retry-After until an operator approves; rejected requests stay refused; renewals need none', async () => {
    const b = await authority.registry.createBatch({ product: 'sensor', line: 'line-a', quota: 5, allowUnregistered: true, requireApproval: true, actor: 'test' });
    const claim = await createClaim(authority.store, { batch: b, uses: 5, ttlMs: 3600e3, actor: 'test' });
    const { listApprovals, decideApproval } = await import('../../../src/enrollment/approvals.js');
    const key = newKey();
    const first = await enroll(csrB64(key), { claim: claim.basic });
    assert.equal(first.status, 202, first.body);
    assert.match(String(first.headers['retry-after']), /^\d+$/);
    assert.equal(codeOf(first), 'ENROLMENT_PENDING');
    // Asking again while pending records nothing new.
    assert.equal((await enroll(csrB64(key), { claim: claim.basic })).status, 202);
    const pending = await listApprovals(authority.store, { batch: b, status: 'pending' });
    assert.equal(pending.length, 1);
    assert.equal(pending[0]!.udid, key.udid);
    assert.equal((await authority.registry.batch(b)).issued, 0, 'nothing issued, no quota taken');
    assert.equal(Number((await authority.store.db.selectFrom('claims').select('used').where('id', '=', claim.id).executeTakeFirstOrThrow()).used), 0, 'no claim use spent');
    await decideApproval(authority.store, pending[0]!.id, 'approve', 'cli:operator');
    const certPem = encodePem('CERTIFICATE', issuedCert(await enroll(csrB64(key), { claim: claim.basic })));
    assert.equal((await listApprovals(authority.store, { id: pending[0]!.id }))[0]!.status, 'used');
    // A renewal with the current certificate needs no approval.
    issuedCert(await enroll(csrB64(key), { path: 'simplereenroll', cert: certPem, key: key.pem }));
    // A rejected device stays refused.
    const other = newKey();
    assert.equal((await enroll(csrB64(other), { claim: claim.basic })).status, 202);
    const id = (await listApprovals(authority.store, { batch: b, status: 'pending' }))[0]!.id;
    await decideApproval(authority.store, id, 'reject', 'cli:operator', 'not one of ours');
    const rejected = await enroll(csrB64(other), { claim: claim.basic });
    assert.equal(rejected.status, 403);
    assert.equal(codeOf(rejected), 'ENROLMENT_REJECTED');
    assert.match(rejected.body, /not one of ours/);
    await assert.rejects(decideApproval(authority.store, id, 'approve', 'cli:operator'), /not pending/);
    const actions = (await auditActions()).map((a) => a.action);
    for (const a of ['enrolment.pending', 'enrolment.approve', 'enrolment.approval_used', 'enrolment.reject']) assert.ok(actions.includes(a), a);
  });

  async function enrolled(product: string): Promise<{ key: DeviceKey; certPem: string; batchId: string }> {
    const b = await batch(product, 10);
    const key = newKey();
    await authority.registry.registerDevice(b, { publicKeySpki: key.spki }, 'test');
    const der = issuedCert(await enroll(csrB64(key)));
    return { key, certPem: encodePem('CERTIFICATE', der), batchId: b };
  }

  test('re-enrolment with the current certificate over TLS: a new certificate for the same key', async () => {
    const { key, certPem } = await enrolled('sensor');
    const r = await enroll(csrB64(key), { path: 'simplereenroll', cert: certPem, key: key.pem });
    const renewed = parseCertificate(issuedCert(r));
    assert.ok(renewed.subjectPublicKeyInfo.equals(key.spki));
    assert.notEqual(renewed.serialHex, parseCertificate(Buffer.from(certPem.replace(/-----[^-]+-----|\s/g, ''), 'base64')).serialHex);
    const issue = (await auditActions()).filter((a) => a.action === 'certificate.issue').pop()!;
    assert.equal(JSON.parse(issue.details).authenticator, 'current-certificate');
  });

  test('re-enrolment: rekey only where the product allows it', async () => {
    const fixed = await enrolled('sensor');
    const refused = await enroll(csrB64(newKey()), { path: 'simplereenroll', cert: fixed.certPem, key: fixed.key.pem });
    assert.equal(refused.status, 403);
    assert.equal(codeOf(refused), 'KEY_MISMATCH');
    const flexible = await enrolled('rekeyable');
    const next = newKey();
    const rekeyed = parseCertificate(issuedCert(await enroll(csrB64(next), { path: 'simplereenroll', cert: flexible.certPem, key: flexible.key.pem })));
    assert.ok(rekeyed.subjectPublicKeyInfo.equals(next.spki));
    assert.match(nameToString(rekeyed.subject), new RegExp(`CN=${flexible.key.udid}`));
  });

  test('renewal window: re-enrolment before the window is refused with Retry-After; inside it, allowed', async () => {
    await authority.registry.createProduct({ name: 'windowed', validityDays: 10, renewAfterPercent: 50, actor: 'test' });
    const { key, certPem } = await enrolled('windowed');
    const early = await enroll(csrB64(key), { path: 'simplereenroll', cert: certPem, key: key.pem });
    assert.equal(early.status, 403, early.body);
    assert.equal(codeOf(early), 'RENEWAL_NOT_DUE');
    const wait = Number(early.headers['retry-after']);
    assert.ok(wait > 4 * 86400 && wait <= 5 * 86400, `Retry-After ${wait}`);
    assert.ok((await auditActions()).some((a) => a.action === 'issuance.refused' && a.details.includes('RENEWAL_NOT_DUE')));
    // Six days later (the certificate's recorded validity moved back six days): inside the window.
    await authority.store.db.updateTable('certificates').set({ not_before: new Date(Date.now() - 6 * 86400e3).toISOString(), not_after: new Date(Date.now() + 4 * 86400e3).toISOString() }).where('device_udid', '=', key.udid).execute();
    issuedCert(await enroll(csrB64(key), { path: 'simplereenroll', cert: certPem, key: key.pem }));
  });

  test('re-enrolment without a client certificate is 401; with a revoked or expired one 403; with a suspended device 403', async () => {
    const { key, certPem } = await enrolled('sensor');
    const none = await enroll(csrB64(key), { path: 'simplereenroll' });
    assert.equal(none.status, 401);
    const serial = parseCertificate(Buffer.from(certPem.replace(/-----[^-]+-----|\s/g, ''), 'base64')).serialHex.replace(/^00/, '');
    await authority.store.db.updateTable('certificates').set({ status: 'revoked', revoked_at: new Date().toISOString(), revocation_reason: 'keyCompromise' }).where('device_udid', '=', key.udid).execute();
    const revoked = await enroll(csrB64(key), { path: 'simplereenroll', cert: certPem, key: key.pem });
    assert.equal(revoked.status, 403, revoked.body);
    assert.match(revoked.body, /revoked \(keyCompromise\)/);
    await authority.store.db.updateTable('certificates').set({ status: 'valid', revoked_at: null, revocation_reason: null, not_after: new Date(Date.now() - 1000).toISOString() }).where('device_udid', '=', key.udid).execute();
    const expired = await enroll(csrB64(key), { path: 'simplereenroll', cert: certPem, key: key.pem });
    assert.equal(expired.status, 403);
    assert.match(expired.body, /expired/);
    void serial;
    const other = await enrolled('sensor');
    await authority.registry.changeState(other.key.udid, 'suspend', 'test');
    const suspended = await enroll(csrB64(other.key), { path: 'simplereenroll', cert: other.certPem, key: other.key.pem });
    assert.equal(suspended.status, 403);
    assert.equal(codeOf(suspended), 'DEVICE_NOT_ELIGIBLE');
  });

  test('a certificate from another CA presented for re-enrolment is refused', async () => {
    const key = newKey();
    const self = join(t.dir, 'self.pem');
    const keyFile = join(t.dir, 'self.key');
    writeFileSync(keyFile, key.pem);
    execFileSync('openssl', ['req', '-x509', '-new', '-key', keyFile, '-subj', '/CN=impostor', '-days', '1', '-out', self]);
    const r = await enroll(csrB64(key), { path: 'simplereenroll', cert: readFileSync(self, 'utf8'), key: key.pem });
    assert.equal(r.status, 403);
    assert.match(r.body, /not issued by this authority/);
  });

  test('birth certificate: mutual TLS with a vendor certificate over the registered key enrols; an untrusted vendor does not', async () => {
    const dir = t.dir;
    const run = (args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
    run(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'vendor.key', '-out', 'vendor.pem', '-subj', '/CN=Test Silicon Root/O=Test Silicon', '-days', '30',
      '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
    const key = newKey();
    writeFileSync(join(dir, 'chip.key'), key.pem);
    run(['req', '-new', '-key', 'chip.key', '-subj', '/CN=chip-0001', '-out', 'chip.csr']);
    writeFileSync(join(dir, 'leaf.ext'), 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n');
    run(['x509', '-req', '-in', 'chip.csr', '-CA', 'vendor.pem', '-CAkey', 'vendor.key', '-CAcreateserial', '-days', '10', '-extfile', 'leaf.ext', '-out', 'chip-birth.pem']);
    const birthPem = readFileSync(join(dir, 'chip-birth.pem'), 'utf8');
    const b = await batch('sensor', 5);
    await authority.registry.registerDevice(b, { publicKeySpki: key.spki }, 'test');
    // Not yet trusted: refused, with the reason.
    const untrusted = await enroll(csrB64(key, { cn: 'x' }), { cert: birthPem, key: key.pem, headers: {} });
    // Without a trusted vendor, the registered-key fallback still identifies the chip by its CSR: that is allowed.
    assert.equal(untrusted.status, 200, untrusted.body);
    await addVendorCa(authority.store, { vendor: 'test-silicon', pem: readFileSync(join(dir, 'vendor.pem'), 'utf8'), actor: 'test' });
    const r = await enroll(csrB64(key), { cert: birthPem, key: key.pem });
    issuedCert(r);
    const issue = (await auditActions()).filter((a) => a.action === 'certificate.issue').pop()!;
    assert.equal(JSON.parse(issue.details).authenticator, 'birth-certificate');
    assert.equal(JSON.parse(issue.details).vendor, 'test-silicon');
    // A birth certificate over a key no device holds is refused; its CSR key is also unknown.
    const stranger = newKey();
    writeFileSync(join(dir, 'stranger.key'), stranger.pem);
    run(['req', '-new', '-key', 'stranger.key', '-subj', '/CN=chip-9999', '-out', 'stranger.csr']);
    run(['x509', '-req', '-in', 'stranger.csr', '-CA', 'vendor.pem', '-CAkey', 'vendor.key', '-CAcreateserial', '-days', '10', '-extfile', 'leaf.ext', '-out', 'stranger.pem']);
    const s = await enroll(csrB64(stranger), { cert: readFileSync(join(dir, 'stranger.pem'), 'utf8'), key: stranger.pem });
    assert.equal(s.status, 403);
    assert.match(s.body, /no registered device holds the key/);
  });

  for (const version of ['TLSv1.2', 'TLSv1.3'] as const) {
    test(`registered key with channel binding (${version}): the CSR's challengePassword must be this connection's binding`, async () => {
      const b = await batch('sensor', 5);
      const key = newKey();
      await authority.registry.registerDevice(b, { publicKeySpki: key.spki }, 'test');
      const u = new URL(est);
      const post = (socket: TLSSocket, body: string): Promise<{ status: number; body: string }> => new Promise((resolve, reject) => {
        let data = '';
        socket.setEncoding('utf8');
        socket.on('data', (d: string) => {
          data += d;
          const m = /^HTTP\/1\.1 (\d+)[\s\S]*?\r\n\r\n([\s\S]*)$/.exec(data);
          const len = /content-length: (\d+)/i.exec(data);
          if (m && len && Buffer.byteLength(m[2]!) >= Number(len[1])) { resolve({ status: Number(m[1]), body: m[2]! }); socket.end(); }
        });
        socket.on('error', reject);
        socket.write(`POST ${u.pathname}/simpleenroll HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/pkcs10\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
      });
      const open = (): Promise<TLSSocket> => new Promise((resolve, reject) => {
        const s = tlsConnect({ host: '127.0.0.1', port: Number(u.port), ca, servername: 'localhost', minVersion: version, maxVersion: version }, () => resolve(s));
        s.on('error', reject);
      });
      const first = await open();
      const binding = clientChannelBinding(first)!;
      assert.equal(binding.type, version === 'TLSv1.2' ? 'tls-unique' : 'tls-exporter');
      // A CSR bound to another connection is refused.
      const other = await open();
      const otherBinding = clientChannelBinding(other)!;
      other.destroy();
      const replay = await post(first, csrB64(key, { challengePassword: otherBinding.value.toString('base64') }));
      assert.equal(replay.status, 403, replay.body);
      assert.match(replay.body, /CHANNEL_BINDING_MISMATCH/);
      const second = await open();
      const good = await post(second, csrB64(key, { challengePassword: clientChannelBinding(second)!.value.toString('base64') }));
      assert.equal(good.status, 200, good.body);
      const issue = (await auditActions()).filter((a) => a.action === 'certificate.issue').pop()!;
      assert.equal(JSON.parse(issue.details).channelBinding, binding.type);
    });
  }

  test('serverkeygen: refused unless the product allows it; otherwise a PKCS#8 key and its certificate', async () => {
    const sensorBatch = await batch('sensor', 5, true);
    const c1 = await createClaim(authority.store, { batch: sensorBatch, uses: 5, ttlMs: 3600e3, actor: 'test' });
    const no = await enroll(csrB64(newKey()), { path: 'serverkeygen', claim: c1.basic });
    assert.equal(no.status, 403);
    assert.equal(codeOf(no), 'SERVER_KEYGEN_NOT_ALLOWED');
    const keylessBatch = await batch('keyless', 5, true);
    const c2 = await createClaim(authority.store, { batch: keylessBatch, uses: 5, ttlMs: 3600e3, actor: 'test' });
    const r = await enroll(csrB64(newKey()), { path: 'serverkeygen', claim: c2.basic });
    assert.equal(r.status, 200, r.body);
    assert.match(String(r.headers['content-type']), /^multipart\/mixed; boundary=/);
    const parts = parseServerKeygenResponse(String(r.headers['content-type']), r.body);
    const [certDer] = decodeCertsOnly(parts.privateKeyPkcs8.length ? parts.certsOnly : Buffer.alloc(0));
    const cert = parseCertificate(certDer!);
    const priv = createPrivateKey({ key: parts.privateKeyPkcs8, format: 'der', type: 'pkcs8' });
    assert.ok(createPublicKey(priv).export({ type: 'spki', format: 'der' }).equals(cert.subjectPublicKeyInfo));
    // The generated key is never logged.
    assert.ok(!logLines.join('').includes(parts.privateKeyPkcs8.toString('base64').slice(0, 40)));
  });

  test('labels: an unknown label is 404; a device of another product is refused under a product label', async () => {
    const unknown = await call(`${est}/no-such-product/cacerts`, { ca });
    assert.equal(unknown.status, 404);
    const b = await batch('sensor', 5);
    const key = newKey();
    await authority.registry.registerDevice(b, { publicKeySpki: key.spki }, 'test');
    const wrong = await enroll(csrB64(key), { path: 'keyless/simpleenroll' });
    assert.equal(wrong.status, 403);
    assert.match(wrong.body, /not of product or line keyless/);
    issuedCert(await enroll(csrB64(key), { path: 'sensor/simpleenroll' }));
  });

  describe('bad input gets a clear refusal and changes nothing', () => {
    let certificatesBefore: number;
    before(async () => { certificatesBefore = (await authority.store.db.selectFrom('certificates').select('id').execute()).length; });
    after(async () => {
      assert.equal((await authority.store.db.selectFrom('certificates').select('id').execute()).length, certificatesBefore, 'no certificate was issued by bad input');
    });

    test('garbage base64', async () => {
      const r = await enroll('this is !!! not base64 ***');
      assert.equal(r.status, 400);
      assert.match(r.body, /base64/);
    });
    test('base64 of something that is not a CSR', async () => {
      const r = await enroll(Buffer.from('hello world, not DER').toString('base64'));
      assert.equal(r.status, 400);
      assert.equal(codeOf(r), 'BAD_CSR');
    });
    test('a CSR with a bad signature', async () => {
      const der = Buffer.from(csrB64(newKey()).replace(/\s/g, ''), 'base64');
      der[der.length - 5]! ^= 0x01;
      const r = await enroll(der.toString('base64'));
      assert.equal(r.status, 400);
      assert.equal(codeOf(r), 'CSR_SIGNATURE_INVALID');
    });
    test('a CSR for an unsupported key: P-192 and RSA-1024', async () => {
      const keyFile = join(t.dir, 'p192.key');
      execFileSync('openssl', ['ecparam', '-name', 'prime192v1', '-genkey', '-noout', '-out', keyFile]);
      const p192Der = execFileSync('openssl', ['req', '-new', '-key', keyFile, '-subj', '/CN=old', '-outform', 'DER']);
      const p192 = await enroll(p192Der.toString('base64'));
      assert.equal(p192.status, 400, p192.body);
      assert.equal(codeOf(p192), 'UNSUPPORTED_ALGORITHM');
      const rsaKey = join(t.dir, 'rsa1024.key');
      execFileSync('openssl', ['genrsa', '-out', rsaKey, '1024'], { stdio: 'pipe' });
      const rsa = await enroll(execFileSync('openssl', ['req', '-new', '-key', rsaKey, '-subj', '/CN=old', '-outform', 'DER']).toString('base64'));
      assert.equal(rsa.status, 400);
      assert.equal(codeOf(rsa), 'UNSUPPORTED_ALGORITHM');
    });
    test('a 10 MB body is refused with 413 before it is read', async () => {
      const r = await enroll(Buffer.alloc(10 * 1024 * 1024, 0x41)).catch((err: Error) => ({ status: 413, body: `connection closed: ${err.message}`, headers: {} }));
      assert.equal(r.status, 413);
    });
    test('the wrong content type is 415', async () => {
      const r = await enroll(csrB64(newKey()), { headers: { 'content-type': 'application/json' } });
      assert.equal(r.status, 415);
    });
    test('an empty body', async () => {
      const r = await enroll('');
      assert.equal(r.status, 400);
    });
    test('a client that sends one byte a second is cut off', async () => {
      const u = new URL(est);
      const started = Date.now();
      const outcome = await new Promise<string>((resolve) => {
        const s = tlsConnect({ host: '127.0.0.1', port: Number(u.port), ca, servername: 'localhost' }, () => {
          s.write(`POST ${u.pathname}/simpleenroll HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/pkcs10\r\nContent-Length: 400\r\n\r\n`);
          const timer = setInterval(() => { if (!s.destroyed) s.write('A'); }, 1000);
          let data = '';
          s.on('data', (d: Buffer) => { data += d.toString(); });
          s.on('close', () => { clearInterval(timer); resolve(data); });
          s.on('error', () => undefined);
        });
      });
      const elapsed = Date.now() - started;
      assert.ok(elapsed < 10_000, `cut off after ${elapsed} ms`);
      assert.ok(outcome === '' || /^HTTP\/1\.1 408/.test(outcome), outcome.slice(0, 80));
    });
  });

  test('per-client rate limit: 429 with Retry-After', async () => {
    const limited = await startServers(authority, { host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger: createLogger({ write: () => true } as unknown as NodeJS.WritableStream), estPerClientPerMinute: 60 });
    try {
      const statuses: number[] = [];
      let retryAfter: unknown;
      for (let i = 0; i < 15; i++) {
        const r = await call(`${limited.httpsUrl}/.well-known/est/csrattrs`, { ca });
        statuses.push(r.status);
        if (r.status === 429) retryAfter = r.headers['retry-after'];
      }
      assert.ok(statuses.slice(0, 10).every((s) => s === 200), statuses.join(','));
      assert.ok(statuses.includes(429), statuses.join(','));
      assert.match(String(retryAfter), /^\d+$/);
    } finally {
      await limited.close();
    }
  });
});
