// The OCSP responder: which CAs it serves, the status of a serial (from the store), the delegated
// signer of each CA, and a cache of pre-signed responses so that a request costs no signature.
//
// Cache policy
//   - A request with one CertID and no nonce is answered from the cache: one signed response per
//     (CA, serial, CertID hash algorithm), valid from thisUpdate to nextUpdate = thisUpdate + validity
//     (default 1 day). An entry older than refreshAfter (default half the validity) that is still asked
//     for is re-signed ahead of its nextUpdate, in the background: requests keep getting the cached one.
//     Entries nobody asked for since they were signed are dropped when they expire. The cache holds at
//     most maxEntries serials (least recently used out first).
//   - A revocation takes effect at once: authority.events 'revoked' (emitted after the commit) drops
//     the serials' entries, and a response being signed while a revocation happens is not cached.
//     Revocations made by another process (the CLI on the same store) are found by polling the store
//     (default every 10 s, an index range scan per CA) and drop their entries the same way.
//   - A suspended device's certificates are on hold: `revoked` with reason certificateHold (RFC 5280
//     §5.3.1; revocationTime = the device's updated_at, its suspension), `good` again once it is resumed.
//     Suspensions and resumptions are found in the audit log (device.suspend / device.resume after the last
//     seq seen) by the same poll, which drops the device's cached responses.
//   - Nonces (RFC 8954): a request with a nonce gets a fresh response signed on demand with the nonce
//     echoed (one signature each; its status read from the store). With nonces: 'ignore' the nonce is
//     ignored and the cached response is served (RFC 5019 §2.2.1 allows this).
//   - Requests with several CertIDs are signed on demand too (RFC 5019 clients send one).
//   - Signing on demand is budgeted per client (onDemandPerMinute, default 6,000 a minute per address):
//     every nonce request, several-CertID request or cache miss costs a signature, so a client could
//     otherwise make the responder sign as fast as it can send (random serials, fresh nonces). Over its
//     budget a client's nonce is ignored and the cached response served (as with nonces: 'ignore' — a
//     cached answer is never stale about a revocation: revocations drop entries at once); what would need
//     a new signature gets `tryLater` (RFC 6960 §4.2.1). Answers already cached cost nothing and are
//     never refused.
//   - A request whose CertIDs name no CA this responder serves gets `unauthorized`; CertIDs of other
//     issuers beside one it serves get `unknown` (one delegated signer speaks only for its own CA).

import { createHash } from 'node:crypto';
import type { Authority } from '../../authority/authority.js';
import { ocspSignerFor, needsRenewal } from '../../authority/ocsp-signers.js';
import { REVOCATION_REASONS, type RevokedEvent } from '../../authority/revocation.js';
import { RateLimiter } from '../../enrollment/rate-limit.js';
import { HallmarkError } from '../../errors.js';
import { rawSql } from '../../store/raw-sql.js';
import {
  CERT_ID_HASHES, encodeOcspStatusResponse, issuerHashes, parseOcspRequest, responderKeyHash, signOcspResponse,
  type CertStatusValue, type OcspCertId, type OcspResponseStatusName, type OcspSigningIdentity, type ParsedOcspRequest,
} from './ocsp.js';

export interface OcspResponderOptions {
  /** nextUpdate - thisUpdate of every response. Default 1 day. */
  readonly validityMs?: number;
  /** A cached response this old is re-signed (in the background) when asked for. Default validity / 2. */
  readonly refreshAfterMs?: number;
  /** Serials kept in the cache (each with its responses per CertID hash). Default 50 000. */
  readonly maxEntries?: number;
  /** 'honour' (default): nonce requests are signed on demand with the nonce echoed. 'ignore': answered from the cache without nonce. */
  readonly nonces?: 'honour' | 'ignore';
  /** How often the store is polled for revocations made by other processes. Default 10 s; 0: never. */
  readonly pollIntervalMs?: number;
  /** How often cached entries due for refresh are re-signed. Default 60 s; 0: only when asked for. */
  readonly refreshIntervalMs?: number;
  /** Signatures made on demand for one client (nonce, several CertIDs, cache miss) per minute; 0: no limit. Default 6,000. */
  readonly onDemandPerMinute?: number;
  /** Clock (tests). */
  readonly now?: () => Date;
  readonly log?: { warn(obj: object, msg: string): void; error(obj: object, msg: string): void };
}

export interface OcspAnswer {
  readonly der: Buffer;
  readonly status: OcspResponseStatusName;
  /** A successful response without nonce: an HTTP cache may keep it until nextUpdate. */
  readonly cacheable: boolean;
  readonly fromCache: boolean;
  readonly producedAt?: Date;
  readonly thisUpdate?: Date;
  readonly nextUpdate?: Date;
  /** Strong ETag of a cacheable response (quoted). */
  readonly etag?: string;
}

export interface OcspStats {
  requests: number;
  /** Responses signed (each one signature). */
  signatures: number;
  cacheHits: number;
  cacheMisses: number;
  backgroundRefreshes: number;
  invalidations: number;
  malformed: number;
  unauthorized: number;
  internalErrors: number;
  /** Nonce requests over their client's budget, answered from the cache without the nonce. */
  noncesIgnored: number;
  /** Answers `tryLater`: their client was over its budget and the answer needed a new signature. */
  tryLater: number;
}

interface CaEntry {
  readonly id: number;
  readonly name: string;
  readonly der: Buffer;
  readonly notAfter: Date | null;
}

interface LoadedSigner {
  readonly identity: OcspSigningIdentity;
  readonly notAfter: Date;
  readonly serial: string;
}

interface CachedResponse {
  readonly der: Buffer;
  readonly kind: CertStatusValue['kind'];
  /** Revoked with reason certificateHold (a suspended device's): a later revocation must replace it. */
  readonly hold: boolean;
  readonly producedAt: Date;
  readonly thisUpdate: Date;
  readonly nextUpdate: Date;
  readonly etag: string;
  readonly certId: OcspCertId;
  /** Asked for since it was signed (only those are refreshed ahead of time). */
  used: boolean;
  refreshing: boolean;
}

const DAY_MS = 86_400_000;
const CA_RELOAD_MIN_MS = 1_000;
/** Revocations are looked for this far before the last poll: a revocation's time is taken before its transaction commits. */
const POLL_OVERLAP_MS = 60_000;
const REFRESH_BATCH = 500;

const MALFORMED = encodeOcspStatusResponse('malformedRequest');
const UNAUTHORIZED = encodeOcspStatusResponse('unauthorized');
const INTERNAL_ERROR = encodeOcspStatusResponse('internalError');
const TRY_LATER = encodeOcspStatusResponse('tryLater');

/** Parsed nonce-free requests kept by their bytes (see respond()). */
const PARSED_MEMO_ENTRIES = 20_000;

export class OcspResponder {
  readonly authority: Authority;
  readonly stats: OcspStats = { requests: 0, signatures: 0, cacheHits: 0, cacheMisses: 0, backgroundRefreshes: 0, invalidations: 0, malformed: 0, unauthorized: 0, internalErrors: 0, noncesIgnored: 0, tryLater: 0 };
  readonly onDemandPerMinute: number;
  readonly #budgets = new RateLimiter();
  readonly validityMs: number;
  readonly refreshAfterMs: number;
  readonly maxEntries: number;
  readonly nonces: 'honour' | 'ignore';
  readonly #now: () => Date;
  readonly #log?: OcspResponderOptions['log'];

  /** Served CAs by `${hash}:${issuerNameHash}:${issuerKeyHash}` (hex). */
  #cas = new Map<string, CaEntry>();
  #casById = new Map<number, CaEntry>();
  #casLoadedAt = 0;
  #casLoading?: Promise<void>;
  readonly #signers = new Map<number, Promise<LoadedSigner>>();
  /** `${caId}:${serial}` -> responses by CertID hash AlgorithmIdentifier (hex). Map order is LRU order. */
  readonly #cache = new Map<string, Map<string, CachedResponse>>();
  readonly #inFlight = new Map<string, { epoch: number; promise: Promise<CachedResponse> }>();
  /** Bumped by every revocation: a response signed across one is not cached. */
  #epoch = 0;
  #lastPoll: Date;
  /** The audit log's seq up to which device suspensions / resumptions were looked at (undefined: not yet). */
  #lastAuditSeq: number | undefined;
  readonly #pollOverlapMs: number;
  readonly #timers: NodeJS.Timeout[] = [];
  readonly #onRevoked = (event: RevokedEvent): void => this.invalidate(event.issuerId, event.serials);
  #closed = false;

  constructor(authority: Authority, options: OcspResponderOptions = {}) {
    this.authority = authority;
    this.validityMs = options.validityMs ?? DAY_MS;
    this.refreshAfterMs = options.refreshAfterMs ?? Math.floor(this.validityMs / 2);
    if (!(this.validityMs >= 60_000) || !(this.refreshAfterMs > 0 && this.refreshAfterMs < this.validityMs)) throw new HallmarkError('BAD_REQUEST', 'OCSP validity must be at least a minute and refreshAfter shorter than it');
    this.maxEntries = Math.max(1, options.maxEntries ?? 50_000);
    this.nonces = options.nonces ?? 'honour';
    this.onDemandPerMinute = Math.max(0, options.onDemandPerMinute ?? 6_000);
    this.#now = options.now ?? (() => new Date());
    this.#log = options.log;
    this.#lastPoll = this.#now();
    this.#pollOverlapMs = Math.max(POLL_OVERLAP_MS, 2 * (options.pollIntervalMs ?? 10_000));
    authority.events.on('revoked', this.#onRevoked);
    const every = (ms: number, fn: () => Promise<void>): void => {
      if (!ms) return;
      const timer = setInterval(() => { fn().catch((err: unknown) => this.#log?.warn({ err }, 'OCSP background task failed')); }, ms);
      timer.unref();
      this.#timers.push(timer);
    };
    // Where the audit log is now: suspensions before this are read from the store when a response is signed.
    void authority.store.db.selectFrom('audit_log').select((eb) => eb.fn.max('seq').as('seq')).executeTakeFirst()
      .then((r) => { this.#lastAuditSeq ??= r?.seq === null || r?.seq === undefined ? 0 : Number(r.seq); }, () => {});
    every(options.pollIntervalMs ?? 10_000, () => this.pollRevocations());
    every(options.refreshIntervalMs ?? 60_000, () => this.refreshDue());
  }

  /** Stops the timers and the event subscription; the cache is dropped. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const t of this.#timers) clearInterval(t);
    this.#timers.length = 0;
    this.authority.events.off('revoked', this.#onRevoked);
    this.#cache.clear();
  }

  /** True once close() has run. */
  get closed(): boolean { return this.#closed; }

  /** Number of serials in the cache. */
  get cacheSize(): number { return this.#cache.size; }

  // ------------------------------------------------------------ answering

  /** Answers one DER OCSPRequest. Never throws: failures are OCSP error statuses. */
  readonly #parsed = new Map<string, ParsedOcspRequest>();

  /** `client` (the requester's address) has its own budget of on-demand signatures; undefined: no budget. */
  async respond(requestDer: Buffer, client?: string): Promise<OcspAnswer> {
    this.stats.requests++;
    // Taken before anything is read from the store: a revocation after this point keeps this answer out of the cache.
    const epoch = this.#epoch;
    // Relying parties ask the same question again and again (the same bytes: one CertID, no nonce). Parsing
    // it with the ASN.1 schema library was the largest single cost of a cached answer, so the parsed form
    // of recent nonce-free requests is kept by their bytes (bounded; a parse is pure, so it never goes stale).
    const memoKey = requestDer.length <= 512 ? requestDer.toString('latin1') : undefined;
    let request = memoKey === undefined ? undefined : this.#parsed.get(memoKey);
    if (!request) {
      try {
        request = parseOcspRequest(requestDer);
      } catch {
        this.stats.malformed++;
        return { der: MALFORMED, status: 'malformedRequest', cacheable: false, fromCache: false };
      }
      if (memoKey !== undefined && !request.nonce && request.certIds.length === 1) {
        if (this.#parsed.size >= PARSED_MEMO_ENTRIES) this.#parsed.clear();
        this.#parsed.set(memoKey, request);
      }
    }
    try {
      return await this.#answer(request, epoch, client);
    } catch (err) {
      this.stats.internalErrors++;
      this.#log?.error({ err }, 'OCSP response failed');
      return { der: INTERNAL_ERROR, status: 'internalError', cacheable: false, fromCache: false };
    }
  }

  /** Takes one on-demand signature from `client`'s budget; false when it has none left. */
  #mayCost(client: string | undefined): boolean {
    if (client === undefined || this.onDemandPerMinute === 0) return true;
    return this.#budgets.take(client, this.onDemandPerMinute, this.#now().getTime()) === 0;
  }

  #tryLater(): OcspAnswer {
    this.stats.tryLater++;
    return { der: TRY_LATER, status: 'tryLater', cacheable: false, fromCache: false };
  }

  async #answer(request: ParsedOcspRequest, epoch: number, client?: string): Promise<OcspAnswer> {
    const cas = await Promise.all(request.certIds.map((id) => this.#caFor(id)));
    const served = cas.find((c): c is CaEntry => !!c);
    if (!served) {
      this.stats.unauthorized++;
      return { der: UNAUTHORIZED, status: 'unauthorized', cacheable: false, fromCache: false };
    }
    let nonce = this.nonces === 'honour' ? request.nonce : undefined;
    // Whether this request's on-demand signature is already taken from the client's budget.
    let paid = false;
    if (request.certIds.length === 1 && nonce) {
      if (this.#mayCost(client)) paid = true;
      else {
        this.stats.noncesIgnored++;
        nonce = undefined;
      }
    }
    if (request.certIds.length === 1 && !nonce) {
      const cached = await this.#cached(served, request.certIds[0]!, epoch, () => this.#mayCost(client));
      if (!cached) return this.#tryLater();
      const { entry, fromCache } = cached;
      return { der: entry.der, status: 'successful', cacheable: true, fromCache, producedAt: entry.producedAt, thisUpdate: entry.thisUpdate, nextUpdate: entry.nextUpdate, etag: entry.etag };
    }
    // On demand: a nonce, or several CertIDs.
    if (!paid && !this.#mayCost(client)) return this.#tryLater();
    const now = this.#second();
    const statuses = await Promise.all(request.certIds.map((id, i) => (cas[i]?.id === served.id ? this.#statusOf(served, id) : Promise.resolve<CertStatusValue>({ kind: 'unknown' }))));
    const nextUpdate = new Date(now.getTime() + this.validityMs);
    const der = await this.#sign(served, {
      producedAt: now,
      nonce,
      responses: request.certIds.map((id, i) => ({ certIdDer: id.der, status: statuses[i]!, thisUpdate: now, nextUpdate })),
    });
    return { der, status: 'successful', cacheable: false, fromCache: false, producedAt: now, thisUpdate: now, nextUpdate };
  }

  /** The cached response for one CertID, signing it when missing or expired (undefined when `maySign` says no). */
  async #cached(ca: CaEntry, certId: OcspCertId, epoch: number, maySign: () => boolean = () => true): Promise<{ entry: CachedResponse; fromCache: boolean } | undefined> {
    const key = `${ca.id}:${certId.serialHex ?? 'x' + certId.der.toString('hex')}`;
    const alg = certId.hashAlgorithmDer.toString('hex');
    const now = this.#now().getTime();
    const byAlg = this.#cache.get(key);
    const hit = byAlg?.get(alg);
    if (hit && now < hit.nextUpdate.getTime()) {
      this.stats.cacheHits++;
      hit.used = true;
      // Most recently used last.
      this.#cache.delete(key);
      this.#cache.set(key, byAlg!);
      if (now >= hit.thisUpdate.getTime() + this.refreshAfterMs && !hit.refreshing) this.#refreshInBackground(ca, key, alg, hit);
      return { entry: hit, fromCache: true };
    }
    // A signature already under way for the same question is shared, whoever's budget it came from.
    const flying = this.#inFlight.get(`${key}/${alg}`);
    if (!(flying && flying.epoch === epoch) && !maySign()) return undefined;
    this.stats.cacheMisses++;
    return { entry: await this.#signCached(ca, key, alg, certId, epoch), fromCache: false };
  }

  /** Signs the response for one CertID and stores it, unless a revocation happened meanwhile. Concurrent callers share one signature. */
  #signCached(ca: CaEntry, key: string, alg: string, certId: OcspCertId, epoch = this.#epoch): Promise<CachedResponse> {
    const flightKey = `${key}/${alg}`;
    const flying = this.#inFlight.get(flightKey);
    if (flying && flying.epoch === epoch) return flying.promise;
    const promise = (async () => {
      const now = this.#second();
      const status = await this.#statusOf(ca, certId);
      const nextUpdate = new Date(now.getTime() + this.validityMs);
      const der = await this.#sign(ca, { producedAt: now, responses: [{ certIdDer: certId.der, status, thisUpdate: now, nextUpdate }] });
      const entry: CachedResponse = {
        der, kind: status.kind, hold: status.kind === 'revoked' && status.reason === REVOCATION_REASONS.certificateHold, producedAt: now, thisUpdate: now, nextUpdate, certId,
        etag: `"${createHash('sha256').update(der).digest('base64url').slice(0, 32)}"`, used: false, refreshing: false,
      };
      if (epoch === this.#epoch && !this.#closed) this.#store(key, alg, entry);
      return entry;
    })().finally(() => {
      if (this.#inFlight.get(flightKey)?.promise === promise) this.#inFlight.delete(flightKey);
    });
    this.#inFlight.set(flightKey, { epoch, promise });
    return promise;
  }

  #store(key: string, alg: string, entry: CachedResponse): void {
    let byAlg = this.#cache.get(key);
    if (byAlg) this.#cache.delete(key);
    else byAlg = new Map();
    byAlg.set(alg, entry);
    this.#cache.set(key, byAlg);
    while (this.#cache.size > this.maxEntries) this.#cache.delete(this.#cache.keys().next().value!);
  }

  #refreshInBackground(ca: CaEntry, key: string, alg: string, entry: CachedResponse): void {
    entry.refreshing = true;
    this.stats.backgroundRefreshes++;
    this.#signCached(ca, key, alg, entry.certId)
      .catch((err: unknown) => this.#log?.warn({ err, ca: ca.name }, 'OCSP cache refresh failed'))
      .finally(() => { entry.refreshing = false; });
  }

  /** Re-signs cached responses that were used since signing and are due; drops expired ones. */
  async refreshDue(): Promise<void> {
    const now = this.#now().getTime();
    let started = 0;
    const work: Promise<unknown>[] = [];
    for (const [key, byAlg] of [...this.#cache]) {
      const caId = Number(key.slice(0, key.indexOf(':')));
      const ca = this.#casById.get(caId);
      for (const [alg, entry] of byAlg) {
        if (now >= entry.nextUpdate.getTime()) { byAlg.delete(alg); continue; }
        if (!ca || entry.refreshing || now < entry.thisUpdate.getTime() + this.refreshAfterMs) continue;
        if (!entry.used) continue; // nobody asked since it was signed: let it expire
        if (started++ >= REFRESH_BATCH) break;
        entry.refreshing = true;
        this.stats.backgroundRefreshes++;
        work.push(this.#signCached(ca, key, alg, entry.certId)
          .catch((err: unknown) => this.#log?.warn({ err, ca: ca.name }, 'OCSP cache refresh failed'))
          .finally(() => { entry.refreshing = false; }));
      }
      if (byAlg.size === 0) this.#cache.delete(key);
    }
    await this.#renewSigners();
    await Promise.all(work);
  }

  // ------------------------------------------------------------ revocation

  /** Drops the cached responses of these serials of CA `issuerId` (after a revocation). */
  invalidate(issuerId: number, serials: readonly string[]): void {
    this.#epoch++;
    for (const serial of serials) {
      if (this.#cache.delete(`${issuerId}:${serial}`)) this.stats.invalidations++;
    }
  }

  /** Looks in the store for revocations made since the last poll (by this or another process) and drops their cached responses. */
  async pollRevocations(): Promise<void> {
    const started = this.#now();
    const since = new Date(this.#lastPoll.getTime() - this.#pollOverlapMs).toISOString();
    await this.#loadCas(true);
    for (const ca of this.#casById.values()) {
      const { rows } = await rawSql<{ serial: string }>(this.authority.store.db, this.authority.store.dialect,
        "select serial from certificates where issuer_id = ? and status = 'revoked' and revoked_at >= ?", [ca.id, since]);
      const stale = rows.map((r) => r.serial).filter((s) => [...(this.#cache.get(`${ca.id}:${s}`)?.values() ?? [])].some((e) => e.kind !== 'revoked' || e.hold));
      if (stale.length) this.invalidate(ca.id, stale);
    }
    await this.#pollHolds();
    this.#lastPoll = started;
  }

  /** Devices suspended or resumed since the last look (the audit log): their certificates' cached responses are dropped. */
  async #pollHolds(): Promise<void> {
    const db = this.authority.store.db;
    const head = await db.selectFrom('audit_log').select((eb) => eb.fn.max('seq').as('seq')).executeTakeFirst();
    const headSeq = head?.seq === null || head?.seq === undefined ? 0 : Number(head.seq);
    const from = this.#lastAuditSeq;
    if (from === undefined || headSeq <= from) { this.#lastAuditSeq = headSeq; return; }
    const udids = [...new Set((await db.selectFrom('audit_log').select('target').where('seq', '>', from).where('seq', '<=', headSeq)
      .where('action', 'in', ['device.suspend', 'device.resume']).execute()).map((r) => r.target))];
    for (let i = 0; i < udids.length; i += 500) {
      const rows = await db.selectFrom('certificates').select(['issuer_id', 'serial']).where('device_udid', 'in', udids.slice(i, i + 500)).execute();
      const byCa = new Map<number, string[]>();
      for (const r of rows) byCa.set(r.issuer_id, [...(byCa.get(r.issuer_id) ?? []), r.serial]);
      for (const [caId, serials] of byCa) this.invalidate(caId, serials);
    }
    this.#lastAuditSeq = headSeq;
  }

  // ------------------------------------------------------------ CAs, signers, status

  async #caFor(certId: OcspCertId): Promise<CaEntry | undefined> {
    const hash = CERT_ID_HASHES.get(certId.hashAlgorithm);
    if (!hash) return undefined;
    const key = `${hash}:${certId.issuerNameHash.toString('hex')}:${certId.issuerKeyHash.toString('hex')}`;
    if (this.#casLoadedAt === 0) await this.#loadCas(true);
    let ca = this.#cas.get(key);
    if (!ca) {
      // A CA created since the last load (a new production line) is found; an unknown issuer costs at most one reload per CA_RELOAD_MIN_MS.
      await this.#loadCas(false);
      ca = this.#cas.get(key);
    }
    return ca;
  }

  async #loadCas(force: boolean): Promise<void> {
    if (!force && Date.now() - this.#casLoadedAt < CA_RELOAD_MIN_MS) return;
    if (this.#casLoading) return this.#casLoading;
    this.#casLoading = (async () => {
      // CAs with a key online only: a factory station's CA (key in its token) cannot certify a delegated
      // signer, so requests about its certificates are answered `unauthorized` (not served here).
      const rows = await this.authority.store.db.selectFrom('certificate_authorities').select(['id', 'name', 'certificate_der', 'not_after'])
        .where('role', '=', 'intermediate').where('status', '=', 'active').where('key_ref', 'is not', null).execute();
      const cas = new Map<string, CaEntry>();
      const byId = new Map<number, CaEntry>();
      for (const r of rows) {
        if (!r.certificate_der) continue;
        const der = Buffer.from(r.certificate_der);
        const entry: CaEntry = { id: r.id, name: r.name, der, notAfter: r.not_after ? new Date(r.not_after) : null };
        byId.set(r.id, entry);
        for (const hash of CERT_ID_HASHES.values()) {
          const h = issuerHashes(der, hash);
          cas.set(`${hash}:${h.nameHash.toString('hex')}:${h.keyHash.toString('hex')}`, entry);
        }
      }
      this.#cas = cas;
      this.#casById = byId;
      this.#casLoadedAt = Date.now();
    })().finally(() => { this.#casLoading = undefined; });
    return this.#casLoading;
  }

  #signerOf(ca: CaEntry): Promise<LoadedSigner> {
    let p = this.#signers.get(ca.id);
    if (!p) {
      p = (async () => {
        const s = await ocspSignerFor(this.authority, ca.name, { now: this.#now() });
        if (s.created) this.#log?.warn({ ca: ca.name, serial: s.serial, notAfter: s.notAfter.toISOString() }, 'OCSP signer certificate issued');
        // certs: the signer, then its CA, so a client holding only the root can build the signer's chain.
        const identity: OcspSigningIdentity = { signer: s.signer, certificates: [s.certificate, ca.der], keyHash: responderKeyHash(s.parsed.subjectPublicKeyInfo) };
        return { identity, notAfter: s.notAfter, serial: s.serial };
      })();
      this.#signers.set(ca.id, p);
      p.catch(() => { if (this.#signers.get(ca.id) === p) this.#signers.delete(ca.id); });
    }
    return p;
  }

  /** Replaces signers that are near their end (a new key and certificate; cached responses stay valid under the old one). */
  async #renewSigners(): Promise<void> {
    const now = this.#now();
    for (const [id, p] of [...this.#signers]) {
      const loaded = await p.catch(() => undefined);
      const ca = this.#casById.get(id);
      if (!loaded || !ca) continue;
      if (needsRenewal(loaded.notAfter, ca.notAfter, now)) {
        this.#signers.delete(id);
        await this.#signerOf(ca).catch((err: unknown) => this.#log?.warn({ err, ca: ca.name }, 'OCSP signer renewal failed'));
      }
    }
  }

  async #sign(ca: CaEntry, spec: Parameters<typeof signOcspResponse>[1]): Promise<Buffer> {
    const signer = await this.#signerOf(ca);
    this.stats.signatures++;
    return signOcspResponse(signer.identity, spec);
  }

  async #statusOf(ca: CaEntry, certId: OcspCertId): Promise<CertStatusValue> {
    if (certId.serialHex === null) return { kind: 'unknown' };
    const { rows } = await rawSql<{ status: string; revoked_at: string | null; revocation_reason: string | null; device_state: string | null; device_updated_at: string | null }>(this.authority.store.db, this.authority.store.dialect,
      'select c.status, c.revoked_at, c.revocation_reason, d.state as device_state, d.updated_at as device_updated_at from certificates c left join devices d on d.udid = c.device_udid where c.issuer_id = ? and c.serial = ?', [ca.id, certId.serialHex]);
    const row = rows[0];
    if (!row) return { kind: 'unknown' };
    // A suspended device's certificate is on hold (RFC 5280 §5.3.1 certificateHold) until it is resumed.
    if (row.status !== 'revoked' && row.device_state === 'suspended') {
      return { kind: 'revoked', at: row.device_updated_at ? new Date(row.device_updated_at) : new Date(0), reason: REVOCATION_REASONS.certificateHold };
    }
    if (row.status !== 'revoked') return { kind: 'good' };
    const reason = REVOCATION_REASONS[row.revocation_reason as keyof typeof REVOCATION_REASONS];
    return { kind: 'revoked', at: row.revoked_at ? new Date(row.revoked_at) : new Date(0), reason: reason === undefined || reason === 0 ? undefined : reason };
  }

  /** Now, to the second (OCSP times carry seconds). */
  #second(): Date {
    return new Date(Math.floor(this.#now().getTime() / 1000) * 1000);
  }

  /** Status of a serial of a CA, as the responder would answer it (for tools and tests). */
  async statusOf(caName: string, serialHex: string): Promise<CertStatusValue> {
    await this.#loadCas(true);
    const ca = [...this.#casById.values()].find((c) => c.name === caName);
    if (!ca) throw new HallmarkError('CA_NOT_FOUND', `CA ${caName} is not served by this OCSP responder`);
    return this.#statusOf(ca, { serialHex } as OcspCertId);
  }
}
