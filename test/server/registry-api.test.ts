import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Authority } from '../../src/authority/authority.js';
import { createToken } from '../../src/authority/tokens.js';
import { createLogger } from '../../src/log.js';
import { createCsr } from '../../src/pki/csr.js';
import { encodeNameString } from '../../src/pki/names.js';
import { encodePem } from '../../src/pki/pem.js';
import { startServers, type RunningServers } from '../../src/server/servers.js';
import { createTestAuthority, type TestAuthority } from '../helpers/authority.js';
import { call } from '../helpers/http.js';

const quiet = { write: () => true } as unknown as NodeJS.WritableStream;

function deviceKey(): { privateKey: KeyObject; publicKeyPem: string; csrFor: (cn: string) => string } {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  return {
    privateKey,
    publicKeyPem: publicKey.export({ type: 'spki', format: 'pem' }) as string,
    csrFor: (cn) => encodePem('CERTIFICATE REQUEST', createCsr({ subject: encodeNameString(`CN=${cn}`), privateKey })),
  };
}

describe('registry admin API', () => {
  let t: TestAuthority;
  let authority: Authority;
  let servers: RunningServers;
  let ca: string;
  let admin: string;
  let reader: string;
  let base: string;

  before(async () => {
    t = await createTestAuthority({ org: 'Api Org' });
    authority = await Authority.open(t.home, t.passphrase);
    servers = await startServers(authority, { host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger: createLogger(quiet) });
    ca = readFileSync(t.rootPem, 'utf8');
    admin = (await createToken(authority.store, { scopes: ['admin'], actor: 'test' })).token;
    reader = (await createToken(authority.store, { scopes: ['registry:read'], actor: 'test' })).token;
    base = `${servers.httpsUrl}/api/v1`;
  });

  after(async () => {
    await servers?.close();
    await authority?.close();
    await t?.cleanup();
  });

  const post = (path: string, body: unknown, token = admin) => call(`${base}${path}`, { ca, token, method: 'POST', body });
  const get = (path: string, token = admin) => call(`${base}${path}`, { ca, token });

  test('product, line, batch, devices, issuance: the whole path over HTTPS', async () => {
    assert.equal((await post('/products', { name: 'thermostat', validityDays: 400 })).status, 201);
    assert.equal((await post('/lines', { name: 'line-1', ca: 'issuing-1' })).status, 201);
    const batchReply = await post('/batches', { product: 'thermostat', line: 'line-1', quota: 2 });
    assert.equal(batchReply.status, 201, batchReply.body);
    const batch = JSON.parse(batchReply.body) as { id: string; quota: number };
    assert.equal(batch.quota, 2);

    const keys = [deviceKey(), deviceKey(), deviceKey()];
    const udids: string[] = [];
    for (const [i, k] of keys.entries()) {
      const r = await post(`/batches/${batch.id}/devices`, { publicKey: k.publicKeyPem, serialNumber: `TH-${i}` });
      assert.equal(r.status, 201, r.body);
      udids.push(JSON.parse(r.body).udid);
    }
    const clone = await post(`/batches/${batch.id}/devices`, { publicKey: keys[0]!.publicKeyPem, udid: 'abcd' });
    assert.equal(clone.status, 409);
    assert.equal(JSON.parse(clone.body).error.code, 'CLONE_DETECTED');

    const issued = await post(`/devices/${udids[0]}/certificates`, { csr: keys[0]!.csrFor('evil') });
    assert.equal(issued.status, 201, issued.body);
    const cert = JSON.parse(issued.body) as { certificate: string; subject: string };
    assert.match(cert.subject, new RegExp(`CN=${udids[0]}`));
    writeFileSync(join(t.dir, 'api-dev.pem'), cert.certificate);
    execFileSync('openssl', ['verify', '-CAfile', t.rootPem, '-untrusted', t.intermediatePem, join(t.dir, 'api-dev.pem')]);

    assert.equal((await post(`/devices/${udids[1]}/certificates`, { csr: keys[1]!.csrFor('x') })).status, 201);
    const over = await post(`/devices/${udids[2]}/certificates`, { csr: keys[2]!.csrFor('x') });
    assert.equal(over.status, 409);
    assert.equal(JSON.parse(over.body).error.code, 'QUOTA_EXCEEDED');
    const wrongKey = await post(`/devices/${udids[1]}/certificates`, { csr: keys[2]!.csrFor('x') });
    assert.equal(JSON.parse(wrongKey.body).error.code, 'KEY_MISMATCH');

    const b = JSON.parse((await get(`/batches/${batch.id}`)).body) as { issued: number; refused: number; registered: number };
    assert.deepEqual([b.issued, b.refused, b.registered], [2, 1, 3]);

    assert.equal((await post(`/devices/${udids[0]}/suspend`, {})).status, 200);
    const suspended = await post(`/devices/${udids[0]}/certificates`, { csr: keys[0]!.csrFor('x') });
    assert.equal(JSON.parse(suspended.body).error.code, 'DEVICE_NOT_ELIGIBLE');
    const illegal = await post(`/devices/${udids[2]}/resume`, {});
    assert.equal(JSON.parse(illegal.body).error.code, 'ILLEGAL_TRANSITION');
    const moved = await post(`/devices/${udids[1]}/transfer`, { tenant: 'customer-42' });
    assert.equal(JSON.parse(moved.body).tenant, 'customer-42');
  });

  test('device lists page with a cursor and filter by state', async () => {
    const batch = JSON.parse((await post('/batches', { product: 'thermostat', line: 'line-1', quota: 100 })).body) as { id: string };
    for (let i = 0; i < 7; i++) assert.equal((await post(`/batches/${batch.id}/devices`, { publicKey: deviceKey().publicKeyPem })).status, 201);
    const seen: string[] = [];
    let after: string | null = null;
    do {
      const page = JSON.parse((await get(`/devices?batch=${batch.id}&limit=3${after ? `&after=${after}` : ''}`)).body) as { items: { udid: string }[]; next: string | null };
      assert.ok(page.items.length <= 3);
      seen.push(...page.items.map((d) => d.udid));
      after = page.next;
    } while (after);
    assert.equal(seen.length, 7);
    assert.equal(new Set(seen).size, 7);
    assert.deepEqual([...seen].sort(), seen, 'ordered by UDID');
    const registered = JSON.parse((await get(`/devices?state=registered&batch=${batch.id}`)).body) as { items: unknown[] };
    assert.equal(registered.items.length, 7);
    const badState = await get('/devices?state=lost');
    assert.equal(badState.status, 400);
  });

  test('a registry:read token reads but cannot write; unknown things are 404 with their code', async () => {
    assert.equal((await get('/products', reader)).status, 200);
    const denied = await post('/products', { name: 'nope' }, reader);
    assert.equal(denied.status, 403);
    assert.equal(JSON.parse((await get('/devices/00ff', admin)).body).error.code, 'DEVICE_NOT_FOUND');
    assert.equal(JSON.parse((await get('/batches/b-000000000000', admin)).body).error.code, 'BATCH_NOT_FOUND');
    const badKey = await post('/batches/b-000000000000/devices', { publicKey: 'AAAA' });
    assert.equal(badKey.status, 400);
  });

  test('a real Microchip manifest imports through the API, idempotently; a tampered one stores nothing', async () => {
    const vectors = join(import.meta.dirname, '..', '..', '..', 'test', 'registry', 'manifests', 'vectors', 'microchip');
    const manifest = readFileSync(join(vectors, 'ECC608C-TNGTLSU-B.json'), 'utf8');
    const signer = readFileSync(join(vectors, 'mchp_verifiers', 'MCHP_manifest_signer_5_Mar_6-2024_noExpiration.crt'), 'utf8');
    const batch = JSON.parse((await post('/batches', { product: 'thermostat', line: 'line-1', quota: 10 })).body) as { id: string };
    const tampered = manifest.replace(/"signature": ?"([A-Za-z0-9_-])/, (m, c: string) => m.slice(0, -1) + (c === 'A' ? 'B' : 'A'));
    assert.notEqual(tampered, manifest);
    const bad = await post(`/batches/${batch.id}/manifests`, { manifest: tampered, trust: [signer], ignoreBirthCertificates: true });
    assert.equal(bad.status, 400, bad.body);
    assert.equal(JSON.parse(bad.body).error.code, 'MANIFEST_INVALID');
    assert.equal(JSON.parse((await get(`/devices?batch=${batch.id}`)).body).items.length, 0, 'nothing stored');
    const first = await post(`/batches/${batch.id}/manifests`, { manifest, trust: [signer], ignoreBirthCertificates: true });
    assert.equal(first.status, 201, first.body);
    assert.equal(JSON.parse(first.body).registered, 10);
    const again = await post(`/batches/${batch.id}/manifests`, { manifest, trust: [signer], ignoreBirthCertificates: true });
    assert.equal(again.status, 200);
    assert.equal(JSON.parse(again.body).unchanged, 10);
    const listed = JSON.parse((await get(`/devices?batch=${batch.id}`)).body) as { items: { udid: string }[] };
    assert.equal(listed.items.length, 10);
    for (const d of listed.items) assert.match(d.udid, /^01[0-9a-f]{16}$/, 'UDIDs are the chips\' uniqueIds');
  });

  test('the OpenAPI document lists the registry routes', async () => {
    const doc = JSON.parse((await call(`${base}/openapi.json`, { ca })).body) as { paths: Record<string, unknown> };
    for (const p of ['/api/v1/products', '/api/v1/lines', '/api/v1/batches', '/api/v1/devices', '/api/v1/devices/{udid}/certificates', '/api/v1/vendors', '/api/v1/batches/{id}/manifests']) assert.ok(doc.paths[p], p);
  });
});
