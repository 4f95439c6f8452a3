import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { generateKeyPairSync, sign, type KeyObject } from 'node:crypto';
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

  test('a manifest streamed as the raw body (octet-stream, text/csv) imports like the JSON route; a bad one stores nothing', async () => {
    const vectors = join(import.meta.dirname, '..', '..', '..', 'test', 'registry', 'manifests', 'vectors', 'microchip');
    // Other chips than the JSON route's test imported (those would now be clones).
    const manifest = readFileSync(join(vectors, 'pytrustplatform', 'manifest_ATECC608A-MAH4I.json'));
    const signerPem = readFileSync(join(vectors, 'mchp_verifiers', 'MCHP_manifest_signer_2_Aug-15-2019_Aug-15-2020.crt'));
    const upload = (batch: string, body: Buffer, headers: Record<string, string>, query = '', token = admin) =>
      call(`${base}/batches/${batch}/manifests/upload${query}`, { ca, token, method: 'POST', rawBody: body, headers });
    const devicesOf = async (batch: string) => (JSON.parse((await get(`/devices?batch=${batch}`)).body) as { items: { udid: string }[] }).items;

    // Microchip, as application/octet-stream, the signer in Hallmark-Trust.
    const mchp = JSON.parse((await post('/batches', { product: 'thermostat', line: 'line-1', quota: 10 })).body) as { id: string };
    const trust = { 'content-type': 'application/octet-stream', 'hallmark-trust': signerPem.toString('base64') };
    const first = await upload(mchp.id, manifest, trust, '?ignoreBirthCertificates=true');
    assert.equal(first.status, 201, first.body);
    assert.deepEqual([JSON.parse(first.body).format, JSON.parse(first.body).registered], ['microchip', 2]);
    const again = await upload(mchp.id, manifest, trust, '?ignoreBirthCertificates=true');
    assert.equal(again.status, 200, again.body);
    assert.equal(JSON.parse(again.body).unchanged, 2);
    assert.equal((await devicesOf(mchp.id)).length, 2);

    // A signed CSV list as text/csv, its detached signature in Hallmark-Signature.
    const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const keys = Array.from({ length: 3 }, () => generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ type: 'spki', format: 'der' }));
    const csv = Buffer.from(`udid,public_key,serial\n${keys.map((k, i) => `,${k.toString('base64')},UP-${i}`).join('\n')}\n`);
    const listHeaders = (body: Buffer) => ({
      'content-type': 'text/csv', 'hallmark-trust': Buffer.from(publicKey.export({ type: 'spki', format: 'pem' }) as string).toString('base64'),
      'hallmark-signature': sign('sha256', body, privateKey).toString('base64'),
    });
    const list = JSON.parse((await post('/batches', { product: 'thermostat', line: 'line-1', quota: 10 })).body) as { id: string };
    const tampered = Buffer.from(csv.toString().replace('UP-1', 'UP-9'));
    const refused = await upload(list.id, tampered, listHeaders(csv));
    assert.equal(refused.status, 400, refused.body);
    assert.equal(JSON.parse(refused.body).error.code, 'MANIFEST_INVALID');
    assert.equal((await devicesOf(list.id)).length, 0, 'nothing stored');
    const imported = await upload(list.id, csv, listHeaders(csv));
    assert.equal(imported.status, 201, imported.body);
    assert.deepEqual([JSON.parse(imported.body).format, JSON.parse(imported.body).registered], ['csv', 3]);
    assert.equal((await devicesOf(list.id)).length, 3);

    // Refusals: no signer, a JSON body, no token, a body that is empty.
    const noTrust = await upload(list.id, csv, { 'content-type': 'text/csv' });
    assert.equal(noTrust.status, 400);
    assert.match(JSON.parse(noTrust.body).error.message, /Hallmark-Trust/);
    const json = await upload(list.id, Buffer.from('{"manifest":"x"}'), { 'content-type': 'application/json', 'hallmark-trust': signerPem.toString('base64') });
    assert.equal(json.status, 400);
    assert.match(JSON.parse(json.body).error.message, /Content-Type/);
    assert.equal((await upload(list.id, csv, listHeaders(csv), '', '')).status, 401);
    assert.equal((await upload(list.id, csv, listHeaders(csv), '', reader)).status, 403);
    const empty = await upload(list.id, Buffer.alloc(0), trust);
    assert.equal(empty.status, 400);
    assert.equal(JSON.parse(empty.body).error.code, 'MANIFEST_INVALID');
    assert.equal((await devicesOf(list.id)).length, 3);
  });

  test('the OpenAPI document lists the registry routes', async () => {
    const doc = JSON.parse((await call(`${base}/openapi.json`, { ca })).body) as { paths: Record<string, unknown> };
    for (const p of ['/api/v1/products', '/api/v1/lines', '/api/v1/batches', '/api/v1/devices', '/api/v1/devices/{udid}/certificates', '/api/v1/vendors', '/api/v1/batches/{id}/manifests', '/api/v1/batches/{id}/manifests/upload']) assert.ok(doc.paths[p], p);
  });
});
