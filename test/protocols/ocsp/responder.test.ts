// The OCSP responder without HTTP: statuses from the store, the pre-signed cache (and what it costs in
// signatures), revocations in this process and in another, refresh ahead of nextUpdate, the bound.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { Authority } from '../../../src/authority/authority.js';
import { OfflineRoot } from '../../../src/authority/offline-root.js';
import { NULL, octetString, oid, seq } from '../../../src/pki/der.js';
import { OCSP_OIDS, certIdFor, encodeOcspRequest, parseOcspResponse, verifyOcspResponse, type ParsedSingleResponse } from '../../../src/protocols/ocsp/ocsp.js';
import { OcspResponder, type OcspAnswer } from '../../../src/protocols/ocsp/responder.js';
import { createTestAuthority, deviceCsr, type TestAuthority } from '../../helpers/authority.js';

const single = (a: OcspAnswer): ParsedSingleResponse => {
  assert.equal(a.status, 'successful');
  const p = parseOcspResponse(a.der);
  assert.equal(p.basic!.responses.length, 1);
  return p.basic!.responses[0]!;
};

describe('OCSP responder', () => {
  let t: TestAuthority;
  let authority: Authority;
  let issuing: Buffer;
  let caId: number;
  const responders: OcspResponder[] = [];
  const responder = (options: ConstructorParameters<typeof OcspResponder>[1] = {}): OcspResponder => {
    for (const old of responders.splice(0)) old.close();
    const r = new OcspResponder(authority, { pollIntervalMs: 0, refreshIntervalMs: 0, ...options });
    responders.push(r);
    return r;
  };
  const issue = async (): Promise<string> => (await authority.issue({ csr: deviceCsr().csrPem, actor: 'test' })).serial;
  const ask = (r: OcspResponder, serial: string, options: { nonce?: Buffer; hash?: 'sha1' | 'sha256'; issuer?: Buffer } = {}) =>
    r.respond(encodeOcspRequest([certIdFor(options.issuer ?? issuing, serial, options.hash ?? 'sha1')], options.nonce));

  before(async () => {
    t = await createTestAuthority();
    authority = await Authority.open(t.home, t.passphrase);
    [issuing] = (await authority.caChain('issuing-1', false)) as [Buffer];
    caId = (await authority.directory.caRow('issuing-1')).id;
  });

  after(async () => {
    for (const r of responders) r.close();
    await authority?.close();
    await t?.cleanup();
  });

  test('good, revoked (time and reason), unknown; signed by the delegated signer, which verifies', async () => {
    const r = responder();
    const good = await issue();
    const revoked = await issue();
    await authority.revoke({ serial: revoked }, 'cessationOfOperation', 'test');
    const g = await ask(r, good);
    assert.equal(single(g).status, 'good');
    const p = parseOcspResponse(g.der);
    const { signer } = verifyOcspResponse(p, issuing);
    assert.deepEqual(p.basic!.certificates[1], issuing, 'the CA certificate follows the signer');
    assert.ok(!signer.equals(issuing), 'a delegated signer, not the CA key');
    const rv = single(await ask(r, revoked));
    assert.equal(rv.status, 'revoked');
    assert.equal(rv.revocationReason, 5);
    const row = await authority.store.db.selectFrom('certificates').select('revoked_at').where('serial', '=', revoked).executeTakeFirstOrThrow();
    assert.equal(rv.revocationTime!.getTime(), Math.floor(new Date(row.revoked_at!).getTime() / 1000) * 1000);
    assert.equal(single(await ask(r, 'abcdef0123')).status, 'unknown');
    // thisUpdate / nextUpdate: one day apart by default.
    const s = single(g);
    assert.equal(s.nextUpdate!.getTime() - s.thisUpdate.getTime(), 86_400_000);
    // SHA-256 CertIDs are matched too, and answered with the hash they came with.
    const s256 = single(await ask(r, good, { hash: 'sha256' }));
    assert.equal(s256.status, 'good');
    assert.equal(s256.issuerNameHash.length, 32);
  });

  test('unauthorized for issuers it does not serve (the root, a stranger); malformedRequest for garbage', async () => {
    const r = responder();
    const [root] = (await authority.caChain(await authority.rootName(), false)) as [Buffer];
    assert.equal((await ask(r, '01', { issuer: root })).status, 'unauthorized');
    const stranger = encodeOcspRequest([seq(seq(oid(OCSP_OIDS.sha1), NULL), octetString(randomBytes(20)), octetString(randomBytes(20)), Buffer.from([0x02, 0x01, 0x01]))]);
    assert.equal((await r.respond(stranger)).status, 'unauthorized');
    const bad = await r.respond(Buffer.from('garbage'));
    assert.equal(bad.status, 'malformedRequest');
    assert.equal(parseOcspResponse(bad.der).status, 'malformedRequest');
    assert.equal((await r.respond(encodeOcspRequest([certIdFor(issuing, '01')], randomBytes(33)))).status, 'malformedRequest');
    assert.equal(r.stats.signatures, 0, 'refusals cost no signature');
    assert.equal(r.stats.unauthorized, 2);
    assert.equal(r.stats.malformed, 2);
  });

  test('the cache: one signature per serial, none for repeats; concurrent first requests share one', async () => {
    const r = responder();
    const serial = await issue();
    const answers = await Promise.all(Array.from({ length: 20 }, () => ask(r, serial)));
    assert.equal(r.stats.signatures, 1);
    assert.ok(answers.every((a) => a.der.equals(answers[0]!.der)));
    for (let i = 0; i < 50; i++) assert.ok((await ask(r, serial)).fromCache);
    assert.equal(r.stats.signatures, 1);
    assert.ok(answers[0]!.cacheable && answers[0]!.etag);
    // Another hash algorithm is another CertID to echo: its own response, cached as well.
    await ask(r, serial, { hash: 'sha256' });
    await ask(r, serial, { hash: 'sha256' });
    assert.equal(r.stats.signatures, 2);
  });

  test('nonces: echoed and signed on demand (honour); or ignored and answered from the cache', async () => {
    const serial = await issue();
    const r = responder();
    const nonce = randomBytes(16);
    for (let i = 0; i < 3; i++) {
      const a = await ask(r, serial, { nonce });
      assert.equal(a.cacheable, false);
      const p = parseOcspResponse(a.der);
      assert.deepEqual(p.basic!.nonce!.subarray(2), nonce);
    }
    assert.equal(r.stats.signatures, 3);
    const ignoring = responder({ nonces: 'ignore' });
    await ask(ignoring, serial, { nonce });
    const second = await ask(ignoring, serial, { nonce: randomBytes(16) });
    assert.equal(parseOcspResponse(second.der).basic!.nonce, undefined);
    assert.ok(second.fromCache);
    assert.equal(ignoring.stats.signatures, 1);
  });

  test('several CertIDs: one signed response; a CertID of another issuer in it is unknown', async () => {
    const r = responder();
    const a = await issue();
    const b = await issue();
    const [root] = (await authority.caChain(await authority.rootName(), false)) as [Buffer];
    const answer = await r.respond(encodeOcspRequest([certIdFor(issuing, a), certIdFor(issuing, b, 'sha256'), certIdFor(root, a)]));
    const p = parseOcspResponse(answer.der);
    assert.deepEqual(p.basic!.responses.map((x) => x.status), ['good', 'good', 'unknown']);
    assert.equal(r.stats.signatures, 1);
    verifyOcspResponse(p, issuing);
  });

  test('a revocation in this process replaces the cached answer at once', async () => {
    const r = responder();
    const serial = await issue();
    assert.equal(single(await ask(r, serial)).status, 'good');
    await ask(r, serial, { hash: 'sha256' });
    await authority.revoke({ serial }, 'keyCompromise', 'test');
    assert.equal(single(await ask(r, serial)).status, 'revoked');
    assert.equal(single(await ask(r, serial, { hash: 'sha256' })).status, 'revoked');
    assert.ok(r.stats.invalidations >= 1);
  });

  test('a response being signed while a revocation happens is not cached', async () => {
    const r = responder();
    const serial = await issue();
    const pending = ask(r, serial);
    r.invalidate(caId, [serial]); // as the 'revoked' event would, before the signature completes
    await pending;
    const next = await ask(r, serial);
    assert.equal(next.fromCache, false);
    assert.equal(r.stats.signatures, 2);
  });

  test('a revocation by another process (same store) is found by polling', async () => {
    const r = responder();
    const serial = await issue();
    assert.equal(single(await ask(r, serial)).status, 'good');
    const other = await Authority.open(t.home, t.passphrase); // like `hallmark revoke` while the server runs
    try {
      await other.revoke({ serial }, 'superseded', 'cli');
    } finally {
      await other.close();
    }
    assert.equal(single(await ask(r, serial)).status, 'good', 'not seen yet: no event in this process');
    await r.pollRevocations();
    const after = single(await ask(r, serial));
    assert.equal(after.status, 'revoked');
    assert.equal(after.revocationReason, 4);
  });

  test('refresh ahead of nextUpdate: served from the cache, re-signed in the background; expired entries re-signed on demand', async () => {
    let now = Date.now();
    const r = responder({ now: () => new Date(now), validityMs: 3600_000, refreshAfterMs: 1800_000 });
    const serial = await issue();
    const first = await ask(r, serial);
    assert.equal(r.stats.signatures, 1);
    now += 1800_000 + 1000;
    const stale = await ask(r, serial);
    assert.ok(stale.fromCache);
    assert.equal(stale.thisUpdate!.getTime(), first.thisUpdate!.getTime(), 'the request did not wait for the new signature');
    for (let i = 0; i < 100 && r.stats.signatures < 2; i++) await new Promise((resolve) => setTimeout(resolve, 5));
    assert.equal(r.stats.signatures, 2);
    const fresh = await ask(r, serial);
    assert.ok(fresh.fromCache);
    assert.ok(fresh.thisUpdate!.getTime() > first.thisUpdate!.getTime());
    now += 3600_000 + 1000;
    const expired = await ask(r, serial);
    assert.equal(expired.fromCache, false);
    assert.equal(r.stats.signatures, 3);
  });

  test('refreshDue re-signs entries in use and lets unused ones expire', async () => {
    let now = Date.now();
    const r = responder({ now: () => new Date(now), validityMs: 3600_000, refreshAfterMs: 1800_000 });
    const used = await issue();
    const unused = await issue();
    await ask(r, used);
    await ask(r, unused);
    await ask(r, used); // asked again since it was signed
    now += 1800_000 + 1000;
    await r.refreshDue();
    assert.equal(r.stats.signatures, 3);
    assert.equal(r.cacheSize, 2);
    now += 1800_000 + 1000; // the unused one is past its nextUpdate now
    await r.refreshDue();
    assert.equal(r.cacheSize, 1);
  });

  test('the cache is bounded (least recently used out)', async () => {
    const r = responder({ maxEntries: 3 });
    const serials = [await issue(), await issue(), await issue(), await issue()];
    for (const s of serials) await ask(r, s);
    assert.equal(r.cacheSize, 3);
    assert.equal((await ask(r, serials[0]!)).fromCache, false, 'the oldest went out');
    assert.equal((await ask(r, serials[3]!)).fromCache, true);
  });

  test('a CA installed later is served, with a signer made on first use', async () => {
    const r = responder();
    const { csrPem } = await authority.requestCa({ name: 'line-later', actor: 'test' });
    const root = await OfflineRoot.open(t.rootDir, t.passphrase);
    const signed = await root.signIntermediate({ csr: csrPem, pathLen: 0 });
    await root.close();
    await authority.installCa({ certificate: signed.der, actor: 'test' });
    const cert = await authority.issue({ csr: deviceCsr().csrPem, ca: 'line-later', actor: 'test' });
    await new Promise((resolve) => setTimeout(resolve, 1100)); // the CA table is re-read at most once a second
    const a = await ask(r, cert.serial, { issuer: signed.der });
    assert.equal(single(a).status, 'good');
    verifyOcspResponse(parseOcspResponse(a.der), signed.der);
    assert.ok(authority.config.ocspSigners['line-later']);
    assert.equal((await r.statusOf('line-later', cert.serial)).kind, 'good');
  });

  test('on-demand signing is budgeted per client: over it, nonces are ignored (cached answer), misses get tryLater; other clients and cached answers unaffected', async () => {
    // Burst: a tenth of a minute's budget, at least 10 signatures.
    const r = responder({ onDemandPerMinute: 10 });
    const known = await issue();
    const cached = await r.respond(encodeOcspRequest([certIdFor(issuing, known, 'sha1')]), 'attacker');
    assert.equal(cached.status, 'successful');
    const signaturesBefore = r.stats.signatures;
    // Fresh nonces from one address: 9 more signatures (10 in all with the miss above), then none.
    const answers: OcspAnswer[] = [];
    for (let i = 0; i < 15; i++) answers.push(await r.respond(encodeOcspRequest([certIdFor(issuing, known, 'sha1')], randomBytes(16)), 'attacker'));
    assert.ok(answers.every((a) => a.status === 'successful'), `a nonce request is always answered: ${answers.map((a) => a.status).join(' ')}`);
    const withNonce = answers.filter((a) => parseOcspResponse(a.der).basic!.nonce !== undefined).length;
    assert.equal(withNonce, 9);
    assert.equal(r.stats.noncesIgnored, 6);
    assert.equal(r.stats.signatures - signaturesBefore, 9, 'over its budget the client costs no signature');
    assert.ok(answers.at(-1)!.der.equals(cached.der), 'the cached response, without the nonce');
    // Random serials (each a cache miss) from the same address: tryLater, nothing signed or cached.
    const miss = await r.respond(encodeOcspRequest([certIdFor(issuing, randomBytes(16).toString('hex'), 'sha1')]), 'attacker');
    assert.equal(miss.status, 'tryLater');
    assert.equal(parseOcspResponse(miss.der).status, 'tryLater');
    assert.equal(r.stats.tryLater, 1);
    // Several CertIDs need a signature too.
    const multi = await r.respond(encodeOcspRequest([certIdFor(issuing, known, 'sha1'), certIdFor(issuing, known, 'sha256')]), 'attacker');
    assert.equal(multi.status, 'tryLater');
    // The same question already cached is still answered for it; another address has its own budget.
    assert.equal((await r.respond(encodeOcspRequest([certIdFor(issuing, known, 'sha1')]), 'attacker')).status, 'successful');
    const other = await r.respond(encodeOcspRequest([certIdFor(issuing, known, 'sha1')], randomBytes(16)), 'relying-party');
    assert.ok(parseOcspResponse(other.der).basic!.nonce, 'another client still gets its nonce echoed');
    // A revocation still shows at once in what the over-budget client is served (the cache entry is dropped and re-signed... by whoever asks first within budget).
    await authority.revoke({ serial: known }, 'keyCompromise', 'test');
    const afterRevocation = await r.respond(encodeOcspRequest([certIdFor(issuing, known, 'sha1')]), 'relying-party');
    assert.equal(single(afterRevocation).status, 'revoked');
    assert.equal(single(await r.respond(encodeOcspRequest([certIdFor(issuing, known, 'sha1')], randomBytes(16)), 'attacker')).status, 'revoked');
  });

  test('close() unsubscribes from revocation events', () => {
    const before = authority.events.listenerCount('revoked');
    const r = new OcspResponder(authority, { pollIntervalMs: 0, refreshIntervalMs: 0 });
    assert.equal(authority.events.listenerCount('revoked'), before + 1);
    r.close();
    assert.equal(authority.events.listenerCount('revoked'), before);
  });
});
