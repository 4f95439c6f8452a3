// EST with independent clients only: curl and openssl, as the README shows a device enrolling. Also a
// key held in SoftHSM2 through the OpenSSL pkcs11 engine, for the CSR and for TLS re-enrolment.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { Authority } from '../../src/authority/authority.js';
import { createClaim } from '../../src/enrollment/claims.js';
import { createLogger } from '../../src/log.js';
import { parseCertificate } from '../../src/pki/certificate.js';
import { decodePemBlocks } from '../../src/pki/pem.js';
import { udidOfKey } from '../../src/registry/registry.js';
import { startServers, type RunningServers } from '../../src/server/servers.js';
import { createTestAuthority, type TestAuthority } from '../helpers/authority.js';
import { curlPkcs11Skip, makeCsrWithTokenKey, softHsmOpensslKeyOrSkip } from '../helpers/openssl-pkcs11.js';

// Asynchronous: the server runs in this process and must keep answering while the tools run.
const run = promisify(execFile);
const sh = async (cmd: string, args: string[], options: { cwd: string; env?: NodeJS.ProcessEnv }) => (await run(cmd, args, { ...options, encoding: 'utf8', timeout: 30_000 })).stdout;

describe('EST with curl and openssl alone', () => {
  let t: TestAuthority;
  let authority: Authority;
  let servers: RunningServers;
  let est: string;
  let dir: string;
  let batchId: string;

  before(async () => {
    t = await createTestAuthority();
    dir = t.dir;
    authority = await Authority.open(t.home, t.passphrase);
    servers = await startServers(authority, { host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger: createLogger({ write: () => true } as unknown as NodeJS.WritableStream) });
    est = `${servers.httpsUrl}/.well-known/est`;
    await authority.registry.createProduct({ name: 'thermostat', actor: 'test' });
    await authority.registry.createLine({ name: 'line-1', ca: 'issuing-1', actor: 'test' });
    batchId = await authority.registry.createBatch({ product: 'thermostat', line: 'line-1', quota: 100, allowUnregistered: true, actor: 'test' });
  });

  after(async () => {
    await servers?.close();
    await authority?.close();
    await t?.cleanup();
  });

  for (const tls of [['--tlsv1.3'], ['--tlsv1.2', '--tls-max', '1.2']]) {
    test(`cacerts -> key -> CSR -> simpleenroll (claim) -> verify -> simplereenroll (${tls[0]})`, async () => {
      const d = join(dir, tls[0]!.replace(/\W/g, ''));
      await sh('mkdir', ['-p', d], { cwd: dir });
      const curl = (args: string[]) => sh('curl', ['--silent', '--show-error', '--fail-with-body', ...tls, '--cacert', t.rootPem, ...args], { cwd: d });
      // 1. The CA certificates, as a certs-only PKCS#7.
      await curl(['-o', 'cacerts.b64', `${est}/cacerts`]);
      await sh('openssl', ['base64', '-d', '-in', 'cacerts.b64', '-out', 'cacerts.p7'], { cwd: d });
      await sh('openssl', ['pkcs7', '-inform', 'DER', '-in', 'cacerts.p7', '-print_certs', '-out', 'cacerts.pem'], { cwd: d });
      assert.equal(decodePemBlocks(readFileSync(join(d, 'cacerts.pem'), 'utf8'), 1 << 20).length, 2);
      // 2. A key and a CSR (the subject asked for is ignored: the registry decides).
      await sh('openssl', ['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', 'device.key'], { cwd: d });
      await sh('openssl', ['req', '-new', '-key', 'device.key', '-subj', '/CN=please-call-me-admin', '-outform', 'DER', '-out', 'device.csr'], { cwd: d });
      await sh('openssl', ['base64', '-in', 'device.csr', '-out', 'device.csr.b64'], { cwd: d });
      // 3. Enrol with a claim.
      const claim = await createClaim(authority.store, { batch: batchId, uses: 1, ttlMs: 3600e3, actor: 'test' });
      await curl(['--user', claim.basic, '-H', 'Content-Type: application/pkcs10', '--data-binary', '@device.csr.b64', '-o', 'cert.b64', `${est}/simpleenroll`]);
      await sh('openssl', ['base64', '-d', '-in', 'cert.b64', '-out', 'cert.p7'], { cwd: d });
      await sh('openssl', ['pkcs7', '-inform', 'DER', '-in', 'cert.p7', '-print_certs', '-out', 'cert.pem'], { cwd: d });
      const verified = await sh('openssl', ['verify', '-CAfile', t.rootPem, '-untrusted', 'cacerts.pem', '-purpose', 'sslclient', 'cert.pem'], { cwd: d });
      assert.match(verified, /cert\.pem: OK/);
      const text = await sh('openssl', ['x509', '-in', 'cert.pem', '-noout', '-text'], { cwd: d });
      const cert = parseCertificate(decodePemBlocks(readFileSync(join(d, 'cert.pem'), 'utf8'), 1 << 20)[0]!.der);
      const udid = udidOfKey(cert.subjectPublicKeyInfo);
      assert.match(text, new RegExp(`CN ?= ?${udid}`));
      assert.match(text, new RegExp(`URI:urn:hallmark:udid:${udid}`));
      assert.match(text, /TLS Web Client Authentication/);
      assert.doesNotMatch(text, /please-call-me-admin/);
      // The claim is spent: a second device gets 401 with WWW-Authenticate.
      const refused = await run('curl', ['--silent', '--include', ...tls, '--cacert', t.rootPem, '--user', claim.basic, '-H', 'Content-Type: application/pkcs10', '--data-binary', '@device.csr.b64', `${est}/simpleenroll`], { cwd: d, encoding: 'utf8' });
      assert.match(refused.stdout, /^HTTP\/1\.1 401/);
      assert.match(refused.stdout, /www-authenticate: Basic realm="hallmark-est"/i);
      // 4. Re-enrol with the current certificate as the TLS client certificate.
      await curl(['--cert', 'cert.pem', '--key', 'device.key', '-H', 'Content-Type: application/pkcs10', '--data-binary', '@device.csr.b64', '-o', 'renewed.b64', `${est}/simplereenroll`]);
      await sh('openssl', ['base64', '-d', '-in', 'renewed.b64', '-out', 'renewed.p7'], { cwd: d });
      await sh('openssl', ['pkcs7', '-inform', 'DER', '-in', 'renewed.p7', '-print_certs', '-out', 'renewed.pem'], { cwd: d });
      assert.match(await sh('openssl', ['verify', '-CAfile', t.rootPem, '-untrusted', 'cacerts.pem', 'renewed.pem'], { cwd: d }), /OK/);
      const renewed = parseCertificate(decodePemBlocks(readFileSync(join(d, 'renewed.pem'), 'utf8'), 1 << 20)[0]!.der);
      assert.notEqual(renewed.serialHex, cert.serialHex);
      assert.ok(renewed.subjectPublicKeyInfo.equals(cert.subjectPublicKeyInfo));
    });
  }

  test('csrattrs parses with openssl asn1parse', async () => {
    const d = dir;
    await sh('curl', ['--silent', '--fail', '--cacert', t.rootPem, '-o', 'csrattrs.b64', `${est}/csrattrs`], { cwd: d });
    await sh('openssl', ['base64', '-d', '-in', 'csrattrs.b64', '-out', 'csrattrs.der'], { cwd: d });
    const parsed = await sh('openssl', ['asn1parse', '-inform', 'DER', '-in', 'csrattrs.der'], { cwd: d });
    assert.match(parsed, /challengePassword/);
    assert.match(parsed, /prime256v1/);
    assert.match(parsed, /ecdsa-with-SHA256/);
  });

  test('a key held in SoftHSM2: the CSR made by openssl through the pkcs11 engine enrols as a registered key; curl re-enrols with the token key', async (tc) => {
    const key = await softHsmOpensslKeyOrSkip(tc);
    if (!key) return;
    tc.after(() => key.cleanup());
    const d = key.dir;
    const b = await authority.registry.createBatch({ product: 'thermostat', line: 'line-1', quota: 5, actor: 'test' });
    const device = await authority.registry.registerDevice(b, { publicKeySpki: key.publicKeySpkiDer, serialNumber: 'HSM-1' }, 'test');
    const csr = await makeCsrWithTokenKey(key, '/CN=hsm-device');
    writeFileSync(join(d, 'csr.b64'), csr.toString('base64'));
    // No credential but the CSR signed by the registered hardware key.
    await sh('curl', ['--silent', '--show-error', '--fail-with-body', '--cacert', t.rootPem, '-H', 'Content-Type: application/pkcs10', '--data-binary', '@csr.b64', '-o', 'cert.b64', `${est}/simpleenroll`], { cwd: d, env: key.env });
    await sh('openssl', ['base64', '-d', '-in', 'cert.b64', '-out', 'cert.p7'], { cwd: d });
    await sh('openssl', ['pkcs7', '-inform', 'DER', '-in', 'cert.p7', '-print_certs', '-out', 'cert.pem'], { cwd: d });
    const cert = parseCertificate(decodePemBlocks(readFileSync(join(d, 'cert.pem'), 'utf8'), 1 << 20)[0]!.der);
    assert.ok(cert.subjectPublicKeyInfo.equals(key.publicKeySpkiDer));
    assert.equal((await authority.registry.device(device.udid)).state, 'provisioned');
    const curlSkip = curlPkcs11Skip();
    if (curlSkip) { tc.diagnostic(`re-enrolment with the token key skipped: ${curlSkip}`); return; }
    // The token key as the TLS client key: re-enrolment with the current certificate.
    await sh('curl', ['--silent', '--show-error', '--fail-with-body', '--cacert', t.rootPem, ...key.curlArgs(join(d, 'cert.pem')), '-H', 'Content-Type: application/pkcs10', '--data-binary', '@csr.b64', '-o', 'renewed.b64', `${est}/simplereenroll`], { cwd: d, env: key.env });
    await sh('openssl', ['base64', '-d', '-in', 'renewed.b64', '-out', 'renewed.p7'], { cwd: d });
    const printed = await sh('openssl', ['pkcs7', '-inform', 'DER', '-in', 'renewed.p7', '-print_certs'], { cwd: d });
    const renewed = parseCertificate(decodePemBlocks(printed, 1 << 20)[0]!.der);
    assert.notEqual(renewed.serialHex, cert.serialHex);
    const issue = await authority.store.db.selectFrom('audit_log').select('details').where('action', '=', 'certificate.issue').orderBy('seq', 'desc').executeTakeFirstOrThrow();
    assert.equal(JSON.parse(issue.details).authenticator, 'current-certificate');
  });
});
