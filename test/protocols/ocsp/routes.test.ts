// OCSP over HTTP (Fastify inject on the plain HTTP app): POST and GET, headers, refusals, shutdown.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import { Authority } from '../../../src/authority/authority.js';
import { createLogger } from '../../../src/log.js';
import { certIdFor, encodeOcspRequest, parseOcspResponse } from '../../../src/protocols/ocsp/ocsp.js';
import { ocspResponderFor } from '../../../src/protocols/ocsp/routes.js';
import { buildHttpApp } from '../../../src/server/servers.js';
import { createTestAuthority, deviceCsr, type TestAuthority } from '../../helpers/authority.js';

describe('OCSP routes', () => {
  let t: TestAuthority;
  let authority: Authority;
  let app: FastifyInstance;
  let issuing: Buffer;
  let serial: string;

  before(async () => {
    t = await createTestAuthority();
    authority = await Authority.open(t.home, t.passphrase);
    app = await buildHttpApp(authority, createLogger({ write: () => true } as unknown as NodeJS.WritableStream));
    [issuing] = (await authority.caChain('issuing-1', false)) as [Buffer];
    serial = (await authority.issue({ csr: deviceCsr().csrPem, actor: 'test' })).serial;
  });

  after(async () => {
    await app?.close();
    await authority?.close();
    await t?.cleanup();
  });

  const post = (body: Buffer, type = 'application/ocsp-request') => app.inject({ method: 'POST', url: '/ocsp', headers: { 'content-type': type }, payload: body });

  test('POST: application/ocsp-response, not cacheable by HTTP', async () => {
    const r = await post(encodeOcspRequest([certIdFor(issuing, serial)]));
    assert.equal(r.statusCode, 200);
    assert.equal(r.headers['content-type'], 'application/ocsp-response');
    assert.equal(r.headers['cache-control'], 'no-store');
    assert.equal(parseOcspResponse(r.rawPayload).basic!.responses[0]!.status, 'good');
    // A trailing slash is accepted too.
    const slash = await app.inject({ method: 'POST', url: '/ocsp/', headers: { 'content-type': 'application/ocsp-request' }, payload: encodeOcspRequest([certIdFor(issuing, serial)]) });
    assert.equal(slash.statusCode, 200);
  });

  test('GET: base64 in the path (URL-encoded or not); max-age within nextUpdate, ETag, Last-Modified, 304', async () => {
    const der = encodeOcspRequest([certIdFor(issuing, serial)]);
    const r = await app.inject({ method: 'GET', url: `/ocsp/${encodeURIComponent(der.toString('base64'))}` });
    assert.equal(r.statusCode, 200);
    assert.equal(r.headers['content-type'], 'application/ocsp-response');
    const p = parseOcspResponse(r.rawPayload).basic!.responses[0]!;
    assert.equal(p.status, 'good');
    const m = /^max-age=(\d+), public, no-transform, must-revalidate$/.exec(String(r.headers['cache-control']));
    assert.ok(m, String(r.headers['cache-control']));
    assert.ok(Number(m[1]) > 0 && Number(m[1]) * 1000 <= p.nextUpdate!.getTime() - Date.now() + 1000);
    assert.equal(new Date(String(r.headers['last-modified'])).getTime(), p.thisUpdate.getTime());
    assert.equal(new Date(String(r.headers.expires)).getTime(), p.nextUpdate!.getTime());
    const etag = String(r.headers.etag);
    assert.match(etag, /^"[^"]+"$/);
    const plain = await app.inject({ method: 'GET', url: `/ocsp/${der.toString('base64')}` });
    assert.deepEqual(plain.rawPayload, r.rawPayload, 'the same cached response');
    const again = await app.inject({ method: 'GET', url: `/ocsp/${der.toString('base64')}`, headers: { 'if-none-match': etag } });
    assert.equal(again.statusCode, 304);
    // With a nonce: signed on demand, not cacheable.
    const withNonce = await app.inject({ method: 'GET', url: `/ocsp/${encodeURIComponent(encodeOcspRequest([certIdFor(issuing, serial)], randomBytes(16)).toString('base64'))}` });
    assert.equal(withNonce.headers['cache-control'], 'no-store');
    assert.ok(parseOcspResponse(withNonce.rawPayload).basic!.nonce);
  });

  test('refusals: garbage -> malformedRequest (200); a body over 10 KiB -> 413; another content type -> 415', async () => {
    const g = await post(Buffer.from('garbage'));
    assert.equal(g.statusCode, 200);
    assert.equal(parseOcspResponse(g.rawPayload).status, 'malformedRequest');
    const gGet = await app.inject({ method: 'GET', url: '/ocsp/not*base64' });
    assert.equal(gGet.statusCode, 200);
    assert.equal(parseOcspResponse(gGet.rawPayload).status, 'malformedRequest');
    const big = await post(Buffer.alloc(10 * 1024 + 1, 0x30));
    assert.equal(big.statusCode, 413);
    assert.match(big.body, /^INPUT_TOO_LARGE: /);
    const longGet = await app.inject({ method: 'GET', url: `/ocsp/${'A'.repeat(50_000)}` });
    assert.equal(longGet.statusCode, 413);
    const wrong = await post(encodeOcspRequest([certIdFor(issuing, serial)]), 'application/octet-stream');
    assert.equal(wrong.statusCode, 415);
    assert.match(wrong.body, /^UNSUPPORTED_MEDIA_TYPE: .*application\/ocsp-request/);
    const none = await app.inject({ method: 'POST', url: '/ocsp', payload: encodeOcspRequest([certIdFor(issuing, serial)]) });
    assert.equal(none.statusCode, 415);
  });

  test('one responder per authority; closing the app stops it', async () => {
    const responder = ocspResponderFor(authority);
    assert.ok(responder.stats.requests > 0, 'the routes use the shared responder');
    assert.equal(responder.closed, false);
    const listening = authority.events.listenerCount('revoked');
    await app.close();
    assert.equal(responder.closed, true);
    assert.ok(authority.events.listenerCount('revoked') < listening, 'its revocation listener is gone');
    assert.notEqual(ocspResponderFor(authority), responder, 'a new one after close');
    ocspResponderFor(authority).close();
  });
});

describe('OCSP routes: on-demand signing budget per client address', () => {
  test('over one address budget: tryLater for what needs a signature, the cached answer (without nonce) for the rest; another address is unaffected', async () => {
    const t = await createTestAuthority();
    const authority = await Authority.open(t.home, t.passphrase);
    const app = await buildHttpApp(authority, createLogger({ write: () => true } as unknown as NodeJS.WritableStream), { ocspOnDemandPerMinute: 10 });
    try {
      const [issuing] = (await authority.caChain('issuing-1', false)) as [Buffer];
      const serial = (await authority.issue({ csr: deviceCsr().csrPem, actor: 'test' })).serial;
      const ask = (remoteAddress: string, certSerial: string, nonce?: Buffer) =>
        app.inject({ method: 'POST', url: '/ocsp', remoteAddress, headers: { 'content-type': 'application/ocsp-request' }, payload: encodeOcspRequest([certIdFor(issuing, certSerial)], nonce) });
      // Ten nonce requests from one address are signed with the nonce echoed; the eleventh would need
      // another signature, and nothing is cached for that serial yet: tryLater.
      for (let i = 0; i < 10; i++) assert.ok(parseOcspResponse((await ask('192.0.2.7', serial, randomBytes(16))).rawPayload).basic!.nonce, `request ${i + 1}: nonce echoed`);
      assert.equal(parseOcspResponse((await ask('192.0.2.7', serial, randomBytes(16))).rawPayload).status, 'tryLater');
      // Once the answer is cached (another relying party asked without nonce), the over-budget address
      // gets it, without its nonce, at no signature.
      assert.equal(parseOcspResponse((await ask('192.0.2.9', serial)).rawPayload).status, 'successful');
      const served = parseOcspResponse((await ask('192.0.2.7', serial, randomBytes(16))).rawPayload);
      assert.equal(served.status, 'successful');
      assert.equal(served.basic!.nonce, undefined);
      assert.equal(served.basic!.responses[0]!.status, 'good');
      const flood = await ask('192.0.2.7', randomBytes(16).toString('hex'));
      assert.equal(parseOcspResponse(flood.rawPayload).status, 'tryLater');
      const other = await ask('192.0.2.8', serial, randomBytes(16));
      assert.ok(parseOcspResponse(other.rawPayload).basic!.nonce, 'another address still gets its nonce');
    } finally {
      await app.close();
      await authority.close();
      await t.cleanup();
    }
  });
});
