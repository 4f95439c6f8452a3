import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Authority } from '../../src/authority/authority.js';
import { createToken } from '../../src/authority/tokens.js';
import { createLogger } from '../../src/log.js';
import { decodeOne, encodePem } from '../../src/pki/pem.js';
import { startServers, type RunningServers } from '../../src/server/servers.js';
import { createTestAuthority, deviceCsr, type TestAuthority } from '../helpers/authority.js';
import { call, runWithInput } from '../helpers/http.js';

describe('hallmark serve', () => {
  let t: TestAuthority;
  let authority: Authority;
  let servers: RunningServers;
  let ca: string;
  let adminToken: string;
  let readOnlyToken: string;
  let https: string;
  let logLines: string[];

  before(async () => {
    t = await createTestAuthority();
    authority = await Authority.open(t.home, t.passphrase);
    logLines = [];
    const sink = { write: (line: string) => { logLines.push(line); return true; } } as unknown as NodeJS.WritableStream;
    servers = await startServers(authority, { host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger: createLogger(sink) });
    ca = readFileSync(t.rootPem, 'utf8');
    adminToken = (await createToken(authority.store, { scopes: ['admin'], actor: 'test' })).token;
    readOnlyToken = (await createToken(authority.store, { scopes: ['ca:read'], actor: 'test' })).token;
    // The server certificate names localhost; 127.0.0.1 is in its SAN too.
    https = servers.httpsUrl;
  });

  after(async () => {
    await servers?.close();
    await authority?.close();
    await t?.cleanup();
  });

  test('GET /healthz answers on both listeners', async () => {
    const a = await call(`${https}/healthz`, { ca });
    const b = await call(`${servers.httpUrl}/healthz`);
    assert.equal(a.status, 200);
    assert.equal(b.status, 200);
    assert.equal(JSON.parse(a.body).status, 'ok');
  });

  test('TLS 1.2 and TLS 1.3 both negotiate, and the server chain verifies against the root (openssl s_client)', async () => {
    const port = new URL(https).port;
    for (const version of ['-tls1_2', '-tls1_3']) {
      // Asynchronous: the server runs in this process and must keep answering.
      const r = await runWithInput('openssl', ['s_client', '-connect', `127.0.0.1:${port}`, version, '-CAfile', t.rootPem, '-verify_return_error', '-servername', 'localhost'], 'Q\n');
      assert.match(r.stdout, /Verify return code: 0 \(ok\)/, `${version}: ${r.stdout.slice(-400)} ${r.stderr}`);
      assert.match(r.stdout, version === '-tls1_2' ? /Protocol *: TLSv1\.2|TLSv1\.2/ : /TLSv1\.3/);
      // Client certificates are requested, with our root named as acceptable issuer.
      assert.match(r.stdout, /Acceptable client certificate CA names[\s\S]*Root CA/);
    }
  });

  test('a client certificate from this CA is accepted but not required', async () => {
    const { csrPem, privateKey } = deviceCsr('tls-client');
    const issued = await authority.issue({ csr: csrPem, actor: 'test' });
    const cert = `-----BEGIN CERTIFICATE-----\n${issued.der.toString('base64')}\n-----END CERTIFICATE-----\n`;
    const reply = await call(`${https}/healthz`, { ca, cert, key: privateKey.export({ type: 'pkcs8', format: 'pem' }) as string });
    assert.equal(reply.status, 200);
  });

  test('plain HTTP serves only public data: CA certificates, not the admin API', async () => {
    const root = await call(`${servers.httpUrl}/ca/root.pem`);
    assert.equal(root.status, 200);
    assert.equal(root.body.trim(), ca.trim());
    const der = await call(`${servers.httpUrl}/ca/issuing-1.crt`);
    assert.equal(der.headers['content-type'], 'application/pkix-cert');
    const chain = await call(`${servers.httpUrl}/ca/issuing-1-chain.pem`);
    assert.equal((chain.body.match(/BEGIN CERTIFICATE/g) ?? []).length, 2);
    const api = await call(`${servers.httpUrl}/api/v1/cas`, { token: adminToken });
    assert.equal(api.status, 404);
  });

  test('the OpenAPI document is served and lists the admin routes', async () => {
    const r = await call(`${https}/api/v1/openapi.json`, { ca });
    assert.equal(r.status, 200);
    const doc = JSON.parse(r.body);
    assert.equal(doc.openapi, '3.0.3');
    for (const path of ['/api/v1/cas', '/api/v1/certificates', '/api/v1/audit', '/api/v1/tokens']) assert.ok(doc.paths[path], `missing ${path}`);
  });

  test('the admin API needs a bearer token, and a failed attempt is audited', async () => {
    const before = await authority.store.db.selectFrom('audit_log').select((eb) => eb.fn.countAll<number>().as('n')).where('action', '=', 'auth.failed').executeTakeFirstOrThrow();
    const none = await call(`${https}/api/v1/cas`, { ca });
    assert.equal(none.status, 401);
    assert.equal(JSON.parse(none.body).error.code, 'UNAUTHENTICATED');
    const forged = await call(`${https}/api/v1/cas`, { ca, token: adminToken.slice(0, -4) + 'AAAA' });
    assert.equal(forged.status, 401);
    const afterCount = await authority.store.db.selectFrom('audit_log').select((eb) => eb.fn.countAll<number>().as('n')).where('action', '=', 'auth.failed').executeTakeFirstOrThrow();
    assert.equal(Number(afterCount.n), Number(before.n) + 1, 'the forged token is audited');
  });

  test('scopes are enforced: a ca:read token cannot issue', async () => {
    const ok = await call(`${https}/api/v1/cas`, { ca, token: readOnlyToken });
    assert.equal(ok.status, 200);
    assert.equal(JSON.parse(ok.body).items.length, 2);
    const denied = await call(`${https}/api/v1/certificates`, { ca, token: readOnlyToken, method: 'POST', body: { csr: deviceCsr().csrPem } });
    assert.equal(denied.status, 403);
    assert.equal(JSON.parse(denied.body).error.code, 'FORBIDDEN');
  });

  test('POST /api/v1/certificates issues a certificate openssl verifies, recorded before the reply', async () => {
    const r = await call(`${https}/api/v1/certificates`, { ca, token: adminToken, method: 'POST', body: { csr: deviceCsr('api-device').csrPem, subject: 'CN=api-device-7,O=Test Org', uri: ['urn:dev:api-7'] } });
    assert.equal(r.status, 201, r.body);
    const body = JSON.parse(r.body);
    const leaf = join(t.dir, 'api-leaf.pem');
    writeFileSync(leaf, body.certificate);
    execFileSync('openssl', ['verify', '-CAfile', t.rootPem, '-untrusted', t.intermediatePem, leaf]);
    const row = await authority.store.db.selectFrom('certificates').selectAll().where('serial', '=', body.serial).executeTakeFirst();
    assert.ok(row, 'certificate recorded');
    const lookup = await call(`${https}/api/v1/certificates/${body.serial}`, { ca, token: adminToken });
    assert.equal(JSON.parse(lookup.body).items[0].subject, 'CN=api-device-7, O=Test Org');
  });

  test('bad input gets a stable error code and changes nothing', async () => {
    const count = async () => Number((await authority.store.db.selectFrom('certificates').select((eb) => eb.fn.countAll<number>().as('n')).executeTakeFirstOrThrow()).n);
    const n = await count();
    const cases: Array<[unknown, number, string]> = [
      [{ csr: 'not a csr' }, 400, 'BAD_PEM'],
      [{ csr: encodePem('CERTIFICATE REQUEST', decodeOne(deviceCsr().csrPem, ['CERTIFICATE REQUEST'], 65536).subarray(0, 150)) }, 400, 'BAD_CSR'],
      [{ csr: deviceCsr().csrPem.replace(/-----END CERTIFICATE REQUEST-----\n/, '') }, 400, 'BAD_PEM'],
      [{ csr: deviceCsr().csrPem, profile: 'no-such-profile' }, 400, 'UNKNOWN_PROFILE'],
      [{ csr: deviceCsr().csrPem, profile: 'tls-server' }, 400, 'PROFILE_VIOLATION'],
      [{ csr: deviceCsr().csrPem, ca: 'root' }, 409, 'CA_NOT_ACTIVE'],
      [{ csr: deviceCsr().csrPem, extra: 1 }, 400, 'BAD_REQUEST'],
      [{}, 400, 'BAD_REQUEST'],
    ];
    for (const [body, status, code] of cases) {
      const r = await call(`${https}/api/v1/certificates`, { ca, token: adminToken, method: 'POST', body });
      assert.equal(r.status, status, `${JSON.stringify(body).slice(0, 60)} -> ${r.body}`);
      assert.equal(JSON.parse(r.body).error.code, code);
    }
    const tampered = deviceCsr().csrPem.split('\n');
    tampered[3] = tampered[3]!.slice(0, 10) + (tampered[3]![10] === 'A' ? 'B' : 'A') + tampered[3]!.slice(11);
    const bad = await call(`${https}/api/v1/certificates`, { ca, token: adminToken, method: 'POST', body: { csr: tampered.join('\n') } });
    assert.equal(bad.status, 400);
    assert.match(JSON.parse(bad.body).error.code, /^(BAD_CSR|CSR_SIGNATURE_INVALID|UNSUPPORTED_ALGORITHM|BAD_DER)$/);
    const malformedJson = await call(`${https}/api/v1/certificates`, { ca, token: adminToken, method: 'POST', rawBody: '{"csr": ' });
    assert.equal(malformedJson.status, 400);
    const huge = await call(`${https}/api/v1/certificates`, { ca, token: adminToken, method: 'POST', rawBody: JSON.stringify({ csr: 'A'.repeat(300 * 1024) }) });
    assert.equal(huge.status, 413);
    assert.equal(JSON.parse(huge.body).error.code, 'INPUT_TOO_LARGE');
    assert.equal(await count(), n, 'no certificate was recorded');
  });

  test('tokens created through the API cannot exceed the creator\'s scopes', async () => {
    const issuer = (await createToken(authority.store, { scopes: ['tokens:write'], actor: 'test' })).token;
    const escalate = await call(`${https}/api/v1/tokens`, { ca, token: issuer, method: 'POST', body: { scopes: ['admin'] } });
    assert.equal(escalate.status, 403);
    const fine = await call(`${https}/api/v1/tokens`, { ca, token: issuer, method: 'POST', body: { scopes: ['tokens:write'], ttl: '1h' } });
    assert.equal(fine.status, 201);
    const created = JSON.parse(fine.body);
    const del = await call(`${https}/api/v1/tokens/${created.id}`, { ca, token: adminToken, method: 'DELETE' });
    assert.equal(del.status, 204);
    const revoked = await call(`${https}/api/v1/tokens`, { ca, token: created.token });
    assert.equal(revoked.status, 401);
  });

  test('no token, passphrase or key appears in the logs', () => {
    const all = logLines.join('');
    assert.ok(logLines.length > 5, 'requests were logged');
    assert.ok(!all.includes(adminToken), 'admin token logged');
    assert.ok(!all.includes(adminToken.slice('hm_'.length + 16 + 1)), 'token secret logged');
    assert.ok(!all.includes(t.passphrase));
    assert.ok(!/PRIVATE KEY/.test(all));
  });
});
