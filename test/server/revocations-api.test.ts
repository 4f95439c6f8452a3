// Revocation through the admin API and the CLI, and its effect on EST re-enrolment.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { Authority } from '../../src/authority/authority.js';
import { createToken } from '../../src/authority/tokens.js';
import { createClaim } from '../../src/enrollment/claims.js';
import { createLogger } from '../../src/log.js';
import { createCsr } from '../../src/pki/csr.js';
import { encodeNameString } from '../../src/pki/names.js';
import { encodePem } from '../../src/pki/pem.js';
import { decodeCertsOnly } from '../../src/protocols/est/wire.js';
import { startServers, type RunningServers } from '../../src/server/servers.js';
import { createTestAuthority, type TestAuthority } from '../helpers/authority.js';
import { call } from '../helpers/http.js';

const execFileAsync = promisify(execFile);
const BIN = join(import.meta.dirname, '..', '..', '..', 'bin', 'hallmark.js');

describe('revocation: admin API and CLI', () => {
  let t: TestAuthority;
  let authority: Authority;
  let servers: RunningServers;
  let ca: string;
  let revoker: string;
  let reader: string;
  let claim: string;

  before(async () => {
    t = await createTestAuthority();
    authority = await Authority.open(t.home, t.passphrase);
    servers = await startServers(authority, { host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger: createLogger({ write: () => true } as unknown as NodeJS.WritableStream) });
    ca = readFileSync(t.rootPem, 'utf8');
    revoker = (await createToken(authority.store, { scopes: ['certificates:revoke'], actor: 'test' })).token;
    reader = (await createToken(authority.store, { scopes: ['certificates:read'], actor: 'test' })).token;
    await authority.registry.createProduct({ name: 'lamp', actor: 'test' });
    await authority.registry.createLine({ name: 'l1', ca: 'issuing-1', actor: 'test' });
    const batch = await authority.registry.createBatch({ product: 'lamp', line: 'l1', quota: 50, allowUnregistered: true, actor: 'test' });
    claim = (await createClaim(authority.store, { batch, uses: 50, ttlMs: 3600e3, actor: 'test' })).basic;
  });

  after(async () => {
    await servers?.close();
    await authority?.close();
    await t?.cleanup();
  });

  /** A device enrolled over EST: its key (PEM), certificate (PEM) and serial. */
  async function device(): Promise<{ key: string; cert: string; serial: string; csr: string }> {
    const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const csr = createCsr({ subject: encodeNameString('CN=x'), privateKey }).toString('base64');
    const r = await call(`${servers.httpsUrl}/.well-known/est/simpleenroll`, { method: 'POST', ca, rawBody: csr, headers: { 'content-type': 'application/pkcs10', authorization: `Basic ${Buffer.from(claim).toString('base64')}` } });
    assert.equal(r.status, 200, r.body);
    const der = decodeCertsOnly(Buffer.from(r.body, 'base64'))[0]!;
    const { parseCertificate } = await import('../../src/pki/certificate.js');
    return { key: privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, cert: encodePem('CERTIFICATE', der), serial: parseCertificate(der).serialHex.replace(/^00/, ''), csr };
  }
  const reenroll = (d: { key: string; cert: string; csr: string }) => call(`${servers.httpsUrl}/.well-known/est/simplereenroll`, { method: 'POST', ca, rawBody: d.csr, cert: d.cert, key: d.key, headers: { 'content-type': 'application/pkcs10' } });

  test('POST /api/v1/revocations: a serial, then the device cannot re-enrol with that certificate', async () => {
    const d = await device();
    assert.equal((await reenroll(d)).status, 200);
    const denied = await call(`${servers.httpsUrl}/api/v1/revocations`, { method: 'POST', ca, token: reader, body: { serial: d.serial } });
    assert.equal(denied.status, 403);
    const r = await call(`${servers.httpsUrl}/api/v1/revocations`, { method: 'POST', ca, token: revoker, body: { serial: d.serial, reason: 'keyCompromise' } });
    assert.equal(r.status, 200, r.body);
    assert.equal(JSON.parse(r.body).revoked, 1);
    const again = await reenroll(d);
    assert.equal(again.status, 403);
    assert.match(again.body, /revoked \(keyCompromise\)/);
  });

  test('bad requests: two targets, none, an unknown reason', async () => {
    for (const body of [{ serial: 'ab', device: 'cd' }, {}, { batch: 'b-1', reason: 'because' }]) {
      const r = await call(`${servers.httpsUrl}/api/v1/revocations`, { method: 'POST', ca, token: revoker, body });
      assert.equal(r.status, 400, JSON.stringify(body));
    }
  });

  test('CLI: hallmark revoke --device UDID --reason keyCompromise', async () => {
    const d = await device();
    const { parseCertificate } = await import('../../src/pki/certificate.js');
    const { udidOfKey } = await import('../../src/registry/registry.js');
    const udid = udidOfKey(parseCertificate(Buffer.from(d.cert.replace(/-----[^-]+-----|\s/g, ''), 'base64')).subjectPublicKeyInfo);
    const env = { ...process.env, HALLMARK_PASSPHRASE: t.passphrase, HALLMARK_DATABASE_URL: '' };
    const r = await execFileAsync(process.execPath, [BIN, 'revoke', '--device', udid, '--reason', 'keyCompromise', '--json', '--home', t.home], { env, encoding: 'utf8' });
    const out = JSON.parse(r.stdout) as { revoked: number; reason: string };
    assert.equal(out.revoked, 1);
    assert.equal(out.reason, 'keyCompromise');
    assert.equal((await authority.registry.device(udid)).state, 'revoked');
    const bad = await execFileAsync(process.execPath, [BIN, 'revoke', '--device', udid, '--batch', 'x', '--home', t.home], { env, encoding: 'utf8' }).catch((e: { code: number; stderr: string }) => e);
    assert.equal((bad as { code: number }).code, 1);
  });
});
