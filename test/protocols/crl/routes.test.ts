// CRLs over HTTP and HTTPS: paths, content types, caching headers, 304, a revocation showing up in the
// delta at once, refusals.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { request as httpRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { Authority } from '../../../src/authority/authority.js';
import { createLogger } from '../../../src/log.js';
import { decodeOne } from '../../../src/pki/pem.js';
import { parseCrl } from '../../../src/protocols/crl/crl.js';
import { crlPublisherOf } from '../../../src/protocols/crl/routes.js';
import { startServers, type RunningServers } from '../../../src/server/servers.js';
import { createTestAuthority, type TestAuthority } from '../../helpers/authority.js';
import { call } from '../../helpers/http.js';
import { ACTOR, eventually, issueDevices } from './setup.js';

/** GET returning the body as bytes. */
function getCrl(url: string, headers: Record<string, string> = {}, ca?: string): Promise<{ status: number; headers: Record<string, string | string[] | undefined>; der: Buffer }> {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    const req = (u.protocol === 'https:' ? httpsRequest : httpRequest)(u, { headers, ca, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, der: Buffer.concat(chunks) }));
    });
    req.on('error', reject);
    req.end();
  });
}

describe('CRL routes', () => {
  let t: TestAuthority;
  let authority: Authority;
  let servers: RunningServers;
  let http: string;

  before(async () => {
    t = await createTestAuthority();
    authority = await Authority.open(t.home, t.passphrase);
    const sink = { write: () => true } as unknown as NodeJS.WritableStream;
    servers = await startServers(authority, { host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger: createLogger(sink) });
    http = servers.httpUrl;
  });

  after(async () => {
    await servers.close();
    assert.equal(crlPublisherOf(authority), undefined, 'the publisher is stopped with the last app');
    await authority.close();
    await t.cleanup();
  });

  test('GET /crl/issuing-1.crl: DER application/pkix-crl with Cache-Control bounded by nextUpdate, Last-Modified = thisUpdate, ETag = number', async () => {
    const r = await getCrl(`${http}/crl/issuing-1.crl`);
    assert.equal(r.status, 200);
    assert.equal(r.headers['content-type'], 'application/pkix-crl');
    const crl = parseCrl(r.der);
    assert.equal(crl.deltaBase, undefined);
    const maxAge = Number(/max-age=(\d+)/.exec(String(r.headers['cache-control']))?.[1]);
    assert.match(String(r.headers['cache-control']), /^public, max-age=\d+/);
    assert.ok(maxAge > 0 && maxAge <= 3600 && Date.now() + maxAge * 1000 <= crl.nextUpdate!.getTime() + 1000, `max-age ${maxAge}`);
    assert.equal(r.headers['last-modified'], crl.thisUpdate.toUTCString());
    assert.equal(r.headers.etag, `"${crl.number}"`);
    const d = await getCrl(`${http}/crl/issuing-1-delta.crl`);
    assert.equal(d.status, 200);
    const delta = parseCrl(d.der);
    assert.equal(delta.deltaBase, crl.number);
    assert.ok(Number(/max-age=(\d+)/.exec(String(d.headers['cache-control']))?.[1]) <= 60, 'deltas are cached briefly');
    assert.equal(d.headers.etag, `"${delta.number}"`);
  });

  test('304 on a matching If-None-Match or a recent If-Modified-Since; 200 otherwise', async () => {
    const first = await getCrl(`${http}/crl/issuing-1.crl`);
    const etag = String(first.headers.etag);
    const lastModified = String(first.headers['last-modified']);
    const same = await getCrl(`${http}/crl/issuing-1.crl`, { 'if-none-match': `"nope", ${etag}` });
    assert.equal(same.status, 304);
    assert.equal(same.der.length, 0);
    assert.equal(same.headers.etag, etag);
    assert.match(String(same.headers['cache-control']), /max-age=/);
    assert.equal((await getCrl(`${http}/crl/issuing-1.crl`, { 'if-none-match': '"0"' })).status, 200);
    assert.equal((await getCrl(`${http}/crl/issuing-1.crl`, { 'if-modified-since': lastModified })).status, 304);
    assert.equal((await getCrl(`${http}/crl/issuing-1.crl`, { 'if-modified-since': new Date(Date.parse(lastModified) - 60_000).toUTCString() })).status, 200);
    assert.equal((await getCrl(`${http}/crl/issuing-1.crl`, { 'if-none-match': '"0"', 'if-modified-since': lastModified })).status, 200, 'If-None-Match wins');
  });

  test('a revocation shows up in the delta CRL over HTTP within the debounce, with a higher number', async () => {
    const { certs: [victim] } = await issueDevices(authority, 1);
    const before = parseCrl((await getCrl(`${http}/crl/issuing-1-delta.crl`)).der);
    await authority.revoke({ serial: victim!.serial }, 'keyCompromise', ACTOR);
    const after = await eventually(async () => {
      const c = parseCrl((await getCrl(`${http}/crl/issuing-1-delta.crl`)).der);
      return c.entries.some((e) => e.serialHex === victim!.serial) ? c : undefined;
    }, 2000);
    assert.ok(after.number! > before.number!);
    assert.equal(after.entries.find((e) => e.serialHex === victim!.serial)?.reason, 'keyCompromise');
    const stale = await getCrl(`${http}/crl/issuing-1-delta.crl`, { 'if-none-match': `"${before.number}"` });
    assert.equal(stale.status, 200, 'the old ETag no longer matches');
  });

  test('PEM for humans, and the same over HTTPS', async () => {
    const pem = await call(`${http}/crl/issuing-1.pem`);
    assert.equal(pem.status, 200);
    assert.match(pem.body, /^-----BEGIN X509 CRL-----\n/);
    const der = decodeOne(pem.body, ['X509 CRL'], 1 << 20);
    assert.equal(parseCrl(der).deltaBase, undefined);
    assert.match((await call(`${http}/crl/issuing-1-delta.pem`)).body, /BEGIN X509 CRL/);
    const s = await getCrl(`${servers.httpsUrl}/crl/issuing-1.crl`, {}, readFileSync(t.rootPem, 'utf8'));
    assert.equal(s.status, 200);
    assert.equal(s.headers['content-type'], 'application/pkix-crl');
    assert.equal(parseCrl(s.der).number, parseCrl((await getCrl(`${http}/crl/issuing-1.crl`)).der).number, 'one publisher for both listeners');
  });

  test('refusals: unknown CA, the offline root, bad file names', async () => {
    const unknown = await call(`${http}/crl/nope.crl`);
    assert.equal(unknown.status, 404);
    assert.match(unknown.body, /CA_NOT_FOUND/);
    const root = await call(`${http}/crl/${await authority.rootName()}.crl`);
    assert.equal(root.status, 404);
    assert.match(root.body, /root ceremony/);
    for (const bad of ['issuing-1.der', 'issuing-1', '..%2Fx.crl', 'issuing-1-full.crl']) {
      const r = await call(`${http}/crl/${bad}`);
      assert.equal(r.status, 404, bad);
    }
  });
});
