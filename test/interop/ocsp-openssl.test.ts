// OCSP checked by independent clients only: `openssl ocsp` (POST, nonce or not, verification against
// the root) and curl (the GET form, bad bodies), against a real server running in this process.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Authority } from '../../src/authority/authority.js';
import { loadHomeConfig } from '../../src/authority/home.js';
import { OfflineRoot } from '../../src/authority/offline-root.js';
import { createLogger } from '../../src/log.js';
import { createCsr } from '../../src/pki/csr.js';
import { encodeNameString } from '../../src/pki/names.js';
import { encodePem } from '../../src/pki/pem.js';
import { ocspResponderFor } from '../../src/protocols/ocsp/routes.js';
import { startServers, type RunningServers } from '../../src/server/servers.js';
import { createTestAuthority, type TestAuthority } from '../helpers/authority.js';

// Asynchronous: the server runs in this process and must keep answering while the tools run.
// Exit codes are returned, not thrown: openssl ocsp exits non-zero for some answers we expect.
function run(cmd: string, args: string[], cwd: string): Promise<{ code: number | null; stdout: string; stderr: string; out: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    const timer = setTimeout(() => child.kill(), 30_000);
    child.stdout.on('data', (d: Buffer) => { stdout += d.toString('latin1'); });
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString('latin1'); });
    child.on('error', reject);
    child.on('close', (code) => { clearTimeout(timer); resolve({ code, stdout, stderr, out: stdout + stderr }); });
  });
}

describe('OCSP with openssl and curl alone', () => {
  let t: TestAuthority;
  let authority: Authority;
  let servers: RunningServers;
  let dir: string;
  let url: string;
  let batchId: string;
  let deviceSerial: string;

  const deviceCertificate = async (file: string, batch = batchId): Promise<string> => {
    const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const device = await authority.registry.registerDevice(batch, { publicKeySpki: publicKey.export({ type: 'spki', format: 'der' }) }, 'test');
    const cert = await authority.issueForDevice({ udid: device.udid, csr: createCsr({ subject: encodeNameString('CN=x'), privateKey }), actor: 'test' });
    writeFileSync(join(dir, file), encodePem('CERTIFICATE', cert.der));
    return cert.serial;
  };
  const ocsp = (args: string[], issuer = 'issuing.pem') =>
    run('openssl', ['ocsp', '-issuer', issuer, '-url', url, '-CAfile', 'root.pem', '-resp_text', ...args], dir);

  before(async () => {
    t = await createTestAuthority();
    dir = t.dir;
    authority = await Authority.open(t.home, t.passphrase);
    servers = await startServers(authority, { host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger: createLogger({ write: () => true } as unknown as NodeJS.WritableStream) });
    url = `${servers.httpUrl}/ocsp`;
    writeFileSync(join(dir, 'issuing.pem'), readFileSync(t.intermediatePem));
    await authority.registry.createProduct({ name: 'thermostat', actor: 'test' });
    await authority.registry.createLine({ name: 'line-1', ca: 'issuing-1', actor: 'test' });
    batchId = await authority.registry.createBatch({ product: 'thermostat', line: 'line-1', quota: 100, actor: 'test' });
  });

  after(async () => {
    await servers?.close();
    await authority?.close();
    await t?.cleanup();
  });

  test('good, verified against the root; a repeated request without nonce costs no signature', async () => {
    deviceSerial = await deviceCertificate('device.pem');
    const stats = ocspResponderFor(authority).stats;
    const first = await ocsp(['-cert', 'device.pem', '-no_nonce']);
    assert.match(first.out, /device\.pem: good/, first.out);
    assert.match(first.out, /Response verify OK/, first.out);
    assert.match(first.out, /Cert Status: good/);
    assert.match(first.out, /Next Update:/);
    // The delegated signer and its CA ride along in the response.
    assert.match(first.out, /Responder Id: [0-9A-F]{40}/);
    assert.match(first.out, /OCSP Signer/);
    const signed = stats.signatures;
    for (let i = 0; i < 3; i++) {
      const again = await ocsp(['-cert', 'device.pem', '-no_nonce']);
      assert.match(again.out, /device\.pem: good/);
      assert.match(again.out, /Response verify OK/);
    }
    assert.equal(stats.signatures, signed, 'cached responses are served without signing');
    assert.ok(stats.cacheHits >= 3);
  });

  test('nonce: echoed (openssl checks it), one signature per nonce request', async () => {
    const stats = ocspResponderFor(authority).stats;
    const before = stats.signatures;
    const r = await ocsp(['-cert', 'device.pem', '-nonce']);
    assert.match(r.out, /device\.pem: good/, r.out);
    assert.match(r.out, /Response verify OK/);
    assert.match(r.out, /OCSP Nonce:\s*\n\s*0410[0-9A-F]{32}/, r.out);
    assert.doesNotMatch(r.out, /WARNING: no nonce|Nonce Verify error/);
    // openssl sends a nonce by default too.
    const byDefault = await ocsp(['-cert', 'device.pem']);
    assert.match(byDefault.out, /device\.pem: good/);
    assert.doesNotMatch(byDefault.out, /WARNING: no nonce|Nonce Verify error/);
    assert.equal(stats.signatures, before + 2);
  });

  test('revoked at once after authority.revoke (the cached good answer is dropped), with reason and time', async () => {
    const serial = await deviceCertificate('to-revoke.pem');
    const good = await ocsp(['-cert', 'to-revoke.pem', '-no_nonce']);
    assert.match(good.out, /to-revoke\.pem: good/);
    await authority.revoke({ serial }, 'keyCompromise', 'test');
    // No wait: the very next request.
    const r = await ocsp(['-cert', 'to-revoke.pem', '-no_nonce']);
    assert.match(r.out, /to-revoke\.pem: revoked/, r.out);
    assert.match(r.out, /Reason: keyCompromise/);
    const row = await authority.store.db.selectFrom('certificates').select('revoked_at').where('serial', '=', serial).executeTakeFirstOrThrow();
    const at = new Date(row.revoked_at!);
    const text = at.toUTCString().replace(/^\w+, (\d+) (\w+) (\d+) ([\d:]+) GMT$/, (_m, d: string, mon: string, y: string, time: string) => `${mon} ${String(Number(d)).padStart(2, ' ')} ${time} ${y} GMT`);
    assert.ok(r.out.includes(`Revocation Time: ${text}`), `${text} in ${r.out}`);
    assert.match(r.out, /Response verify OK/);
    // And with a nonce (signed on demand) too.
    const n = await ocsp(['-cert', 'to-revoke.pem', '-nonce']);
    assert.match(n.out, /to-revoke\.pem: revoked/);
  });

  test('unknown serial of a served CA -> unknown', async () => {
    const r = await ocsp(['-serial', '0x1234567890abcdef', '-no_nonce']);
    assert.match(r.out, /0x1234567890abcdef: unknown/i, r.out);
    assert.match(r.out, /Response verify OK/);
  });

  test('a CertID for an issuer it does not serve -> unauthorized (a foreign CA, and the offline root)', async () => {
    await run('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'foreign.key', '-subj', '/CN=Foreign CA', '-days', '2', '-out', 'foreign.pem'], dir);
    const r = await ocsp(['-serial', '0x01', '-no_nonce'], 'foreign.pem');
    assert.match(r.out, /Responder Error: unauthorized \(6\)/, r.out);
    const root = await ocsp(['-serial', '0x01', '-no_nonce'], 'root.pem');
    assert.match(root.out, /Responder Error: unauthorized \(6\)/, root.out);
  });

  test('GET (RFC 6960 A.1) with curl: the same answer, with HTTP caching headers', async () => {
    await run('openssl', ['ocsp', '-issuer', 'issuing.pem', '-cert', 'device.pem', '-no_nonce', '-reqout', 'get-req.der'], dir);
    const b64 = readFileSync(join(dir, 'get-req.der')).toString('base64');
    const r = await run('curl', ['--silent', '--show-error', '--fail', '-D', 'get-headers.txt', '-o', 'get-resp.der', `${url}/${encodeURIComponent(b64)}`], dir);
    assert.equal(r.code, 0, r.out);
    const headers = readFileSync(join(dir, 'get-headers.txt'), 'latin1');
    assert.match(headers, /content-type: application\/ocsp-response/i);
    assert.match(headers, /cache-control: max-age=\d+, public, no-transform, must-revalidate/i);
    assert.match(headers, /etag: "[^"]+"/i);
    assert.match(headers, /last-modified: \w{3}, \d\d \w{3} \d{4}/i);
    const check = await run('openssl', ['ocsp', '-respin', 'get-resp.der', '-issuer', 'issuing.pem', '-cert', 'device.pem', '-CAfile', 'root.pem', '-no_nonce', '-resp_text'], dir);
    assert.match(check.out, /device\.pem: good/, check.out);
    assert.match(check.out, /Response verify OK/);
    // Unencoded base64 in the path works too, and If-None-Match gets 304.
    const etag = /etag: ("[^"]+")/i.exec(headers)![1]!;
    const r304 = await run('curl', ['--silent', '-o', '/dev/null', '-w', '%{http_code}', '-H', `If-None-Match: ${etag}`, `${url}/${b64}`], dir);
    assert.equal(r304.stdout, '304');
  });

  test('garbage -> malformedRequest; oversized body -> 413; wrong content type -> 415', async () => {
    writeFileSync(join(dir, 'garbage.bin'), Buffer.from('this is not an OCSP request'));
    const g = await run('curl', ['--silent', '-o', 'garbage-resp.der', '-w', '%{http_code} %{content_type}', '-H', 'Content-Type: application/ocsp-request', '--data-binary', '@garbage.bin', url], dir);
    assert.equal(g.stdout, '200 application/ocsp-response');
    assert.deepEqual(readFileSync(join(dir, 'garbage-resp.der')), Buffer.from([0x30, 0x03, 0x0a, 0x01, 0x01]));
    const parsed = await run('openssl', ['ocsp', '-respin', 'garbage-resp.der', '-resp_text'], dir);
    assert.match(parsed.out, /Responder Error: malformedrequest \(1\)/i, parsed.out);
    const getGarbage = await run('curl', ['--silent', '-o', 'get-garbage.der', '-w', '%{http_code}', `${url}/not*base64`], dir);
    assert.equal(getGarbage.stdout, '200');
    assert.deepEqual(readFileSync(join(dir, 'get-garbage.der')), Buffer.from([0x30, 0x03, 0x0a, 0x01, 0x01]));

    writeFileSync(join(dir, 'big.bin'), Buffer.alloc(64 * 1024, 0x30));
    const big = await run('curl', ['--silent', '-w', '\n%{http_code}', '-H', 'Content-Type: application/ocsp-request', '--data-binary', '@big.bin', url], dir);
    assert.match(big.stdout, /INPUT_TOO_LARGE[\s\S]*\n413$/, big.stdout);
    const wrongType = await run('curl', ['--silent', '-w', '\n%{http_code}', '-H', 'Content-Type: application/json', '--data-binary', '@get-req.der', url], dir);
    assert.match(wrongType.stdout, /UNSUPPORTED_MEDIA_TYPE[\s\S]*\n415$/, wrongType.stdout);
  });

  test('the HTTPS listener answers too', async () => {
    const port = new URL(servers.httpsUrl).port;
    const r = await run('curl', ['--silent', '--show-error', '--cacert', t.rootPem, '-o', 'https-resp.der', '-H', 'Content-Type: application/ocsp-request', '--data-binary', '@get-req.der', `https://localhost:${port}/ocsp`], dir);
    assert.equal(r.code, 0, r.out);
    const check = await run('openssl', ['ocsp', '-respin', 'https-resp.der', '-issuer', 'issuing.pem', '-cert', 'device.pem', '-CAfile', 'root.pem', '-no_nonce'], dir);
    assert.match(check.out, /device\.pem: good/, check.out);
    assert.match(check.out, /Response verify OK/);
  });

  test('a CA installed later (a production line) gets its delegated signer on first use', async () => {
    const { csrPem } = await authority.requestCa({ name: 'line-b-ca', actor: 'test' });
    const root = await OfflineRoot.open(t.rootDir, t.passphrase);
    const signed = await root.signIntermediate({ csr: csrPem, pathLen: 0 });
    await root.close();
    await authority.installCa({ certificate: signed.der, actor: 'test' });
    writeFileSync(join(dir, 'line-b-ca.pem'), encodePem('CERTIFICATE', signed.der));
    assert.equal(authority.config.ocspSigners['line-b-ca'], undefined);
    await authority.registry.createLine({ name: 'line-b', ca: 'line-b-ca', actor: 'test' });
    const batch = await authority.registry.createBatch({ product: 'thermostat', line: 'line-b', quota: 5, actor: 'test' });
    await deviceCertificate('line-b-device.pem', batch);
    // A CertID of an issuer it does not know makes the responder re-read the CA table, at most once a second.
    await new Promise((resolve) => setTimeout(resolve, 1100));
    const r = await ocsp(['-cert', 'line-b-device.pem'], 'line-b-ca.pem');
    assert.match(r.out, /line-b-device\.pem: good/, r.out);
    assert.match(r.out, /Response verify OK/);
    assert.match(r.out, /line-b-ca OCSP Signer/);
    // Recorded in the configuration on disk, so the next start reuses it.
    const saved = (await loadHomeConfig(t.home)).ocspSigners['line-b-ca'];
    assert.ok(saved?.serial);
    // The signer of the first CA is still the one init made (not replaced).
    const check = await ocsp(['-cert', 'device.pem']);
    assert.match(check.out, /device\.pem: good/);
    // A serial of issuing-1 asked of line-b-ca: not issued by that CA, so unknown.
    const crossed = await ocsp(['-serial', `0x${deviceSerial}`, '-no_nonce'], 'line-b-ca.pem');
    assert.match(crossed.out, /: unknown/, crossed.out);
    assert.match(crossed.out, /Response verify OK/);
    // With -cert, openssl takes the name hash from the certificate's issuer (issuing-1) and the key hash from
    // -issuer (line-b-ca): a CertID naming no single CA is not answered for.
    const mixed = await ocsp(['-cert', 'device.pem', '-no_nonce'], 'line-b-ca.pem');
    assert.match(mixed.out, /Responder Error: unauthorized \(6\)/, mixed.out);
  });
});
