// The connection decision for one presented client certificate (zero trust: checked at every connection).
//
// A certificate is allowed when it was issued by one of the store's CAs (issuer name and signature), that
// CA chains through the store's hierarchy to an active root, it and its CAs are valid now, it is on record
// and not revoked, it identifies a registry device whose state allows it to connect. The answer carries
// the device's tenant, product, line, batch and what it may publish / subscribe to (src/connect/policy.ts).
//
// Cost: the first check of a certificate reads the store (a few queries); later checks are answered from a
// local cache keyed by the certificate's SHA-256, with no database read and no parse: a hash, a map lookup,
// a few comparisons. Validity is evaluated at every check. The cache stays coherent by push, not by reads
// per check:
//   - the 'revoked' events of the authority (its own revocations at once; with authority.watchRevocations()
//     running, other processes' revocations within about a second);
//   - a tail of the audit log (start(): every pollMs, default 250 ms) for device state changes
//     (device.suspend / resume / revoke / decommission / transfer / register / reregister), line moves,
//     product changes, certificate revocations and CA changes (ca.*: the CA table is read again);
//   - a cold check that raced with one of these is done again before its result is cached.

import type { EventEmitter } from 'node:events';
import * as nodeCrypto from 'node:crypto';
import type { DetailedPeerCertificate, TLSSocket } from 'node:tls';
import { MAX_CERTIFICATE_BYTES, parseCertificate, serialToHex, type ParsedCertificate } from '../pki/certificate.js';
import { verifyIssuedBy } from '../pki/verify.js';
import type { RevokedEvent } from '../authority/revocation.js';
import type { Store } from '../store/database.js';
import type { DeviceState } from '../store/schema.js';
import { parsePolicy, permissionsFor, type Permissions } from './policy.js';

export type DecisionCode =
  | 'OK' | 'UNKNOWN_CA' | 'BAD_CHAIN' | 'EXPIRED' | 'NOT_YET_VALID' | 'REVOKED' | 'UNKNOWN_DEVICE'
  | 'DEVICE_SUSPENDED' | 'DEVICE_REVOKED' | 'DEVICE_DECOMMISSIONED' | 'NOT_A_DEVICE_CERTIFICATE' | 'MALFORMED';

export interface Decision {
  readonly allowed: boolean;
  readonly code: DecisionCode;
  readonly reason: string;
  readonly udid?: string;
  readonly tenant?: string;
  readonly product?: string;
  readonly line?: string;
  readonly batch?: string;
  /** Serial of the presented certificate (canonical hex), when it was parsed. */
  readonly serial?: string;
  /** Name of the issuing CA, when it was found. */
  readonly issuer?: string;
  readonly permissions?: Permissions;
}

/** What the checker needs: a store and, to hear about revocations at once, the authority's events. Authority fits. */
export interface ConnectionSource {
  readonly store: Store;
  readonly events?: EventEmitter;
}

export interface ConnectionCheckerOptions {
  /** Audit tail interval (start()). Default 250 ms. */
  readonly pollMs?: number;
  /** Certificates kept in the cache. Default 100 000. */
  readonly maxEntries?: number;
}

export const CHAIN_LIMITS = { certificates: 8, certificateBytes: MAX_CERTIFICATE_BYTES } as const;

/** Device states that may connect. */
const CONNECTABLE: ReadonlySet<DeviceState> = new Set(['registered', 'provisioned', 'active']);

/** Audit actions that change what a cached decision depends on. */
const DEVICE_ACTIONS = ['device.suspend', 'device.resume', 'device.revoke', 'device.decommission', 'device.transfer', 'device.register', 'device.reregister'];
const WATCHED_ACTIONS = [...DEVICE_ACTIONS, 'certificate.revoke', 'line.move'];

// crypto.hash (Node >= 20.12): a one-shot digest without a Hash object.
const oneShot = (nodeCrypto as { hash?: (algorithm: string, data: Buffer, encoding: 'hex') => string }).hash;
const sha256Hex: (data: Buffer) => string = typeof oneShot === 'function'
  ? (data) => oneShot('sha256', data, 'hex')
  : (data) => nodeCrypto.createHash('sha256').update(data).digest('hex');

/** Bytes at the end of a leaf's DER used as its warm-path key (part of the signature value). */
const TAIL_BYTES = 24;

type Refusal = { readonly code: Exclude<DecisionCode, 'OK'>; readonly reason: string };

/** One CA of the store, with its verified path to a root (computed when the CA table is read). */
interface CaNode {
  readonly id: number;
  readonly name: string;
  readonly parentId: number | null;
  readonly role: string;
  readonly status: string;
  readonly parsed: ParsedCertificate;
  /** This CA's certificate and its issuers' up to the root (DER, this first). */
  chain: readonly Buffer[];
  /** Why this CA cannot vouch for anything, or undefined when it chains to an active root. */
  untrusted: Refusal | undefined;
  /** The window in which the whole path (this CA up to the root) is valid, and the CA that bounds each end. */
  notBefore: number;
  notBeforeCa: string;
  notAfter: number;
  notAfterCa: string;
}

/** A device as the decision needs it; shared by every cached certificate of the device, updated in place. */
interface DeviceInfo {
  readonly udid: string;
  /** undefined: no such device in the registry. */
  state: DeviceState | undefined;
  tenant: string;
  productId: number;
  product: string;
  line: string;
  batch: string;
  permissions: Permissions | undefined;
  policyError: string | undefined;
  version: number;
  refs: number;
}

interface Entry {
  readonly fingerprint: string;
  /** The leaf certificate's DER: a warm check finds the entry by the DER's last bytes and compares it whole. */
  readonly der: Buffer;
  readonly ca: CaNode;
  readonly serial: string;
  readonly notBefore: number;
  readonly notAfter: number;
  /** Revocation reason, or undefined while valid. */
  revoked: string | undefined;
  /** 'device': `device` says who; otherwise why it is not a device certificate. */
  readonly kind: 'device' | 'operator-device-profile' | 'not-device';
  readonly profile: string;
  device: DeviceInfo | undefined;
  /** The allowed decision, made once per device version. */
  memo: Decision | undefined;
  memoVersion: number;
}

export class ConnectionChecker {
  readonly #store: Store;
  readonly #events: EventEmitter | undefined;
  readonly #pollMs: number;
  readonly #maxEntries: number;

  #cas = new Map<number, CaNode>();
  #casBySubject = new Map<string, CaNode[]>();
  #casLoaded: Promise<void> | undefined;
  #casLoadedAt = 0;

  readonly #entries = new Map<string, Entry>();
  /**
   * Warm path index: the last bytes of the leaf's DER (inside its signature, so random and unique per
   * certificate) to its entry; a hit is confirmed by comparing the whole DER. Measured: hashing the leaf
   * with SHA-256 for every check was most of a warm check's cost.
   */
  readonly #byTail = new Map<string, Entry>();
  /** `${issuerId}:${serial}` → entry, for revocation events. */
  readonly #bySerial = new Map<string, Entry>();
  readonly #devices = new Map<string, DeviceInfo>();

  /** Bumped by everything that may invalidate a cold check in flight. */
  #epoch = 0;
  #lastSeq: number | undefined;
  #timer: NodeJS.Timeout | undefined;
  #polling: Promise<void> | undefined;
  #onRevoked: ((e: RevokedEvent) => void) | undefined;
  #closed = false;

  /** Counters: warm (cache) and cold (store) checks, invalidations received. */
  readonly stats = { warm: 0, cold: 0, revocationEvents: 0, deviceUpdates: 0, caReloads: 0, polls: 0, pollErrors: 0 };

  constructor(source: ConnectionSource, options: ConnectionCheckerOptions = {}) {
    this.#store = source.store;
    this.#events = source.events;
    this.#pollMs = options.pollMs ?? 250;
    this.#maxEntries = options.maxEntries ?? 100_000;
    if (this.#events) {
      this.#onRevoked = (e) => this.revoked(e);
      this.#events.on('revoked', this.#onRevoked);
    }
  }

  /** Starts the audit-log tail (device state changes, revocations, CA changes). Resolves once the tail's start point is read. */
  async start(): Promise<void> {
    if (this.#timer || this.#closed) return;
    if (this.#lastSeq === undefined) this.#lastSeq = await this.#maxSeq();
    this.#timer = setInterval(() => void this.poll(), this.#pollMs);
    this.#timer.unref();
  }

  /** Stops the tail and stops listening to events. The store is the caller's. */
  async close(): Promise<void> {
    this.#closed = true;
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = undefined;
    if (this.#events && this.#onRevoked) this.#events.off('revoked', this.#onRevoked);
    await this.#polling;
  }

  /** Number of certificates cached. */
  get size(): number { return this.#entries.size; }

  /** Forgets every cached decision input (the next checks read the store). */
  clear(): void {
    this.#epoch++;
    this.#entries.clear();
    this.#byTail.clear();
    this.#bySerial.clear();
    this.#devices.clear();
  }

  // ------------------------------------------------------------ checks

  /** The decision for a presented chain (DER, leaf first) at `at` (default now). Never throws for bad input. */
  async check(chain: readonly Buffer[], at?: Date): Promise<Decision> {
    const atMs = at ? at.getTime() : Date.now();
    const malformed = checkShape(chain);
    if (malformed) return malformed;
    const quick = this.#quick(chain[0]!);
    if (quick) {
      this.stats.warm++;
      return this.#decide(quick, chain, atMs);
    }
    const fingerprint = sha256Hex(chain[0]!);
    const entry = this.#entries.get(fingerprint);
    if (entry) {
      this.stats.warm++;
      return this.#decide(entry, chain, atMs);
    }
    this.stats.cold++;
    return this.#cold(chain, fingerprint, atMs);
  }

  /** The decision from the cache alone (synchronous), or undefined when the certificate is not cached. */
  checkCached(chain: readonly Buffer[], at?: Date): Decision | undefined {
    const malformed = checkShape(chain);
    if (malformed) return malformed;
    const entry = this.#quick(chain[0]!) ?? this.#entries.get(sha256Hex(chain[0]!));
    if (!entry) return undefined;
    this.stats.warm++;
    return this.#decide(entry, chain, at ? at.getTime() : Date.now());
  }

  #quick(leaf: Buffer): Entry | undefined {
    if (leaf.length < TAIL_BYTES) return undefined;
    const entry = this.#byTail.get(leaf.toString('latin1', leaf.length - TAIL_BYTES, leaf.length));
    return entry && entry.der.length === leaf.length && entry.der.equals(leaf) ? entry : undefined;
  }

  /** The decision for the client certificate chain of a TLS connection (as the peer sent it, completed by the server's trust store). */
  checkTlsSocket(socket: TLSSocket, at?: Date): Promise<Decision> {
    let peer: DetailedPeerCertificate | undefined;
    try {
      peer = socket.getPeerCertificate(true);
    } catch {
      peer = undefined;
    }
    // An object without `raw` (an empty object) when the client sent no certificate.
    if (!peer || !peer.raw) return Promise.resolve(refusal({ code: 'MALFORMED', reason: 'the client presented no certificate' }));
    const chain: Buffer[] = [];
    let c: typeof peer | undefined = peer;
    while (c && c.raw) {
      if (chain.length >= CHAIN_LIMITS.certificates + 1) return Promise.resolve(refusal({ code: 'MALFORMED', reason: `the chain has more than ${CHAIN_LIMITS.certificates} certificates` }));
      chain.push(c.raw);
      const next: typeof peer | undefined = c.issuerCertificate;
      if (!next || next === c || (next.raw && next.raw.equals(c.raw))) break;
      c = next;
    }
    return this.check(chain, at);
  }

  // ------------------------------------------------------------ coherence

  /** A revocation (the authority's 'revoked' event): cached certificates among `serials` are refused from now on. */
  revoked(event: RevokedEvent): void {
    this.#epoch++;
    this.stats.revocationEvents++;
    for (const s of event.serials) {
      const entry = this.#bySerial.get(`${event.issuerId}:${s}`);
      if (entry && entry.revoked === undefined) {
        entry.revoked = event.reason;
        entry.memo = undefined;
      }
    }
  }

  /** Reads the audit log after the last entry seen and applies what changed. The tail calls it every pollMs; a server may call it too. */
  poll(): Promise<void> {
    if (this.#polling) return this.#polling;
    this.#polling = this.#pollOnce().finally(() => { this.#polling = undefined; });
    return this.#polling;
  }

  async #pollOnce(): Promise<void> {
    if (this.#closed) return;
    this.stats.polls++;
    try {
      if (this.#lastSeq === undefined) { this.#lastSeq = await this.#maxSeq(); return; }
      const head = await this.#maxSeq();
      if (head <= this.#lastSeq) return;
      const rows = await this.#store.db.selectFrom('audit_log').select(['seq', 'action', 'target', 'details'])
        .where('seq', '>', this.#lastSeq).where('seq', '<=', head)
        .where((eb) => eb.or([eb('action', 'in', WATCHED_ACTIONS), eb('action', 'like', 'ca.%'), eb('action', 'like', 'product.%')]))
        .orderBy('seq').execute();
      const devices = new Set<string>();
      let allDevices = false;
      let reloadCas = false;
      for (const r of rows) {
        if (DEVICE_ACTIONS.includes(r.action)) devices.add(r.target);
        else if (r.action === 'line.move' || r.action.startsWith('product.')) allDevices = true;
        else if (r.action.startsWith('ca.')) reloadCas = true;
        else if (r.action === 'certificate.revoke') this.#revokedByAudit(r.target, r.details);
      }
      if (rows.length > 0) this.#epoch++;
      if (reloadCas) {
        await this.#loadCas();
        this.clear();
      } else if (allDevices) {
        await this.#refreshDevices([...this.#devices.keys()]);
      } else if (devices.size > 0) {
        await this.#refreshDevices([...devices].filter((u) => this.#devices.has(u)));
      }
      this.#lastSeq = head;
    } catch {
      // The store is unreachable for a moment: the next poll reads again from the same point.
      this.stats.pollErrors++;
    }
  }

  #revokedByAudit(serial: string, detailsText: string): void {
    let issuer: unknown;
    let reason: unknown;
    try { ({ issuer, reason } = JSON.parse(detailsText) as { issuer?: unknown; reason?: unknown }); } catch { return; }
    for (const ca of this.#cas.values()) {
      if (ca.name !== issuer) continue;
      const entry = this.#bySerial.get(`${ca.id}:${serial}`);
      if (entry && entry.revoked === undefined) {
        entry.revoked = typeof reason === 'string' ? reason : 'unspecified';
        entry.memo = undefined;
      }
    }
  }

  async #maxSeq(): Promise<number> {
    const r = await this.#store.db.selectFrom('audit_log').select((eb) => eb.fn.max('seq').as('seq')).executeTakeFirst();
    return r?.seq === null || r?.seq === undefined ? 0 : Number(r.seq);
  }

  /** Reads these devices again and updates their shared records in place. */
  async #refreshDevices(udids: readonly string[]): Promise<void> {
    for (let i = 0; i < udids.length; i += 500) {
      const chunk = udids.slice(i, i + 500);
      const rows = await this.#deviceRows(chunk);
      const found = new Map(rows.map((r) => [r.udid, r]));
      for (const u of chunk) {
        const d = this.#devices.get(u);
        if (!d) continue;
        applyDeviceRow(d, found.get(u)); // a new version: the entries' memos are made again
        this.stats.deviceUpdates++;
      }
    }
  }

  #deviceRows(udids: readonly string[]) {
    return this.#store.db.selectFrom('devices')
      .innerJoin('products', 'products.id', 'devices.product_id')
      .innerJoin('lines', 'lines.id', 'devices.line_id')
      .select(['devices.udid', 'devices.state', 'devices.tenant', 'devices.batch_id', 'devices.product_id', 'products.name as product', 'products.policy', 'lines.name as line'])
      .where('devices.udid', 'in', udids).execute();
  }

  // ------------------------------------------------------------ the CA table

  #ensureCas(): Promise<void> {
    this.#casLoaded ??= this.#loadCas().catch((err) => { this.#casLoaded = undefined; throw err; });
    return this.#casLoaded;
  }

  async #loadCas(): Promise<void> {
    const rows = await this.#store.db.selectFrom('certificate_authorities')
      .select(['id', 'name', 'role', 'parent_id', 'status', 'certificate_der']).where('certificate_der', 'is not', null).execute();
    const cas = new Map<number, CaNode>();
    for (const r of rows) {
      let parsed: ParsedCertificate;
      try { parsed = parseCertificate(Buffer.from(r.certificate_der!)); } catch { continue; }
      cas.set(r.id, {
        id: r.id, name: r.name, parentId: r.parent_id, role: r.role, status: r.status, parsed,
        chain: [], untrusted: undefined, notBefore: 0, notBeforeCa: r.name, notAfter: 0, notAfterCa: r.name,
      });
    }
    const done = new Set<number>();
    const resolve = (node: CaNode, depth: number): void => {
      if (done.has(node.id)) return;
      done.add(node.id);
      node.notBefore = node.parsed.notBefore.getTime();
      node.notAfter = node.parsed.notAfter.getTime();
      node.chain = [node.parsed.der];
      if (node.status === 'revoked') node.untrusted = { code: 'REVOKED', reason: `CA ${node.name} was revoked` };
      else if (node.status === 'pending') node.untrusted = { code: 'BAD_CHAIN', reason: `CA ${node.name} is not installed` };
      if (node.role === 'root') {
        if (!node.untrusted && node.status !== 'active') node.untrusted = { code: 'BAD_CHAIN', reason: `root ${node.name} is ${node.status}, not an active root` };
        if (!node.untrusted) {
          try { verifyIssuedBy(node.parsed, node.parsed); } catch { node.untrusted = { code: 'BAD_CHAIN', reason: `root ${node.name} is not self-signed` }; }
        }
        return;
      }
      const parent = node.parentId === null ? undefined : cas.get(node.parentId);
      if (!parent || depth > 16) {
        node.untrusted ??= { code: 'BAD_CHAIN', reason: `CA ${node.name} does not chain to a root of this authority` };
        return;
      }
      resolve(parent, depth + 1);
      if (!node.untrusted) {
        try { verifyIssuedBy(node.parsed, parent.parsed); } catch { node.untrusted = { code: 'BAD_CHAIN', reason: `CA ${node.name} is not signed by its parent ${parent.name}` }; }
      }
      node.untrusted ??= parent.untrusted;
      node.chain = [node.parsed.der, ...parent.chain];
      if (parent.notBefore > node.notBefore) { node.notBefore = parent.notBefore; node.notBeforeCa = parent.notBeforeCa; }
      if (parent.notAfter < node.notAfter) { node.notAfter = parent.notAfter; node.notAfterCa = parent.notAfterCa; }
    };
    for (const node of cas.values()) resolve(node, 0);
    const bySubject = new Map<string, CaNode[]>();
    for (const node of cas.values()) {
      const key = node.parsed.subject.toString('latin1');
      bySubject.set(key, [...(bySubject.get(key) ?? []), node]);
    }
    this.#cas = cas;
    this.#casBySubject = bySubject;
    this.#casLoadedAt = Date.now();
    this.#casLoaded = Promise.resolve();
    this.#epoch++;
    this.stats.caReloads++;
  }

  // ------------------------------------------------------------ cold path

  async #cold(chain: readonly Buffer[], fingerprint: string, atMs: number): Promise<Decision> {
    let leaf: ParsedCertificate;
    try {
      leaf = parseCertificate(chain[0]!);
    } catch (err) {
      return refusal({ code: 'MALFORMED', reason: `the certificate is not a valid X.509 certificate: ${(err as Error).message}` });
    }
    for (let i = 1; i < chain.length; i++) {
      try { parseCertificate(chain[i]!); } catch (err) {
        return refusal({ code: 'MALFORMED', reason: `certificate #${i + 1} of the chain is not a valid X.509 certificate: ${(err as Error).message}` });
      }
    }
    const serial = serialToHex(Buffer.from(leaf.serialHex, 'hex'));
    for (let attempt = 0; ; attempt++) {
      const epoch = this.#epoch;
      const built = await this.#build(leaf, fingerprint, serial);
      if ('code' in built) return { ...refusal(built), serial, ...(built.issuer ? { issuer: built.issuer } : {}) };
      const raced = this.#epoch !== epoch || this.#closed;
      if (!raced) {
        const existing = this.#entries.get(fingerprint);
        if (existing) return this.#decide(existing, chain, atMs);
        this.#insert(built);
        return this.#decide(built, chain, atMs);
      }
      if (attempt >= 2) return this.#decide(built, chain, atMs); // answered, not cached
    }
  }

  /** Reads what the decision depends on from the store. */
  async #build(leaf: ParsedCertificate, fingerprint: string, serial: string): Promise<Entry | (Refusal & { issuer?: string })> {
    await this.#ensureCas();
    let ca = this.#issuerOf(leaf);
    if (!ca && Date.now() - this.#casLoadedAt > 1000) {
      // A CA installed since the table was read (without the audit tail running): read it again, at most once a second.
      await this.#loadCas();
      ca = this.#issuerOf(leaf);
    }
    if (!ca) return { code: 'UNKNOWN_CA', reason: 'the certificate was not issued by a CA of this authority (no CA with its issuer name and a verifying signature)' };
    if (ca.untrusted) return { ...ca.untrusted, issuer: ca.name };
    const row = await this.#store.db.selectFrom('certificates').select(['status', 'revocation_reason', 'device_udid', 'profile', 'fingerprint_sha256'])
      .where('issuer_id', '=', ca.id).where('serial', '=', serial).executeTakeFirst();
    if (!row || row.fingerprint_sha256 !== fingerprint) {
      return { code: 'UNKNOWN_DEVICE', reason: `certificate ${serial} of CA ${ca.name} is not on record (not issued by this authority)`, issuer: ca.name };
    }
    let device: DeviceInfo | undefined;
    let kind: Entry['kind'] = 'device';
    if (row.device_udid === null) {
      kind = row.profile === 'device' ? 'operator-device-profile' : 'not-device';
    } else {
      device = this.#devices.get(row.device_udid);
      if (!device) {
        const [r] = await this.#deviceRows([row.device_udid]);
        device = { udid: row.device_udid, state: undefined, tenant: '', productId: 0, product: '', line: '', batch: '', permissions: undefined, policyError: undefined, version: 0, refs: 0 };
        applyDeviceRow(device, r);
      }
    }
    return {
      fingerprint, der: leaf.der, ca, serial, notBefore: leaf.notBefore.getTime(), notAfter: leaf.notAfter.getTime(),
      revoked: row.status === 'revoked' ? (row.revocation_reason ?? 'unspecified') : undefined,
      kind, profile: row.profile, device, memo: undefined, memoVersion: -1,
    };
  }

  /** The store CA whose subject is the leaf's issuer and whose key verifies its signature. */
  #issuerOf(leaf: ParsedCertificate): CaNode | undefined {
    const candidates = this.#casBySubject.get(leaf.issuer.toString('latin1'));
    if (!candidates) return undefined;
    for (const ca of candidates) {
      try {
        verifyIssuedBy(leaf, ca.parsed);
        return ca;
      } catch { /* another CA with the same name, or a forgery */ }
    }
    return undefined;
  }

  #insert(entry: Entry): void {
    if (this.#entries.size >= this.#maxEntries) {
      // Drop the oldest half (insertion order).
      let drop = Math.max(1, Math.floor(this.#entries.size / 2));
      for (const e of this.#entries.values()) {
        if (drop-- <= 0) break;
        this.#remove(e);
      }
    }
    this.#entries.set(entry.fingerprint, entry);
    if (entry.der.length >= TAIL_BYTES) this.#byTail.set(entry.der.toString('latin1', entry.der.length - TAIL_BYTES, entry.der.length), entry);
    this.#bySerial.set(`${entry.ca.id}:${entry.serial}`, entry);
    if (entry.device) {
      const shared = this.#devices.get(entry.device.udid);
      if (shared) entry.device = shared; // one record per device, the one the tail updates
      else this.#devices.set(entry.device.udid, entry.device);
      entry.device.refs++;
    }
  }

  #remove(entry: Entry): void {
    this.#entries.delete(entry.fingerprint);
    if (entry.der.length >= TAIL_BYTES) {
      const key = entry.der.toString('latin1', entry.der.length - TAIL_BYTES, entry.der.length);
      if (this.#byTail.get(key) === entry) this.#byTail.delete(key);
    }
    this.#bySerial.delete(`${entry.ca.id}:${entry.serial}`);
    if (entry.device && --entry.device.refs <= 0) this.#devices.delete(entry.device.udid);
  }

  // ------------------------------------------------------------ the decision (warm path: no I/O, no parse)

  #decide(entry: Entry, chain: readonly Buffer[], atMs: number): Decision {
    const ca = entry.ca;
    // The certificates presented after the leaf must be its issuers, in order, as the store holds them.
    const expected = ca.chain;
    if (chain.length - 1 > expected.length) return this.#refuse(entry, 'BAD_CHAIN', `the chain has ${chain.length - 1} certificates after the leaf; CA ${ca.name}'s path has ${expected.length}`);
    for (let i = 1; i < chain.length; i++) {
      if (!chain[i]!.equals(expected[i - 1]!)) return this.#refuse(entry, 'BAD_CHAIN', `certificate #${i + 1} of the chain is not the issuer of certificate #${i} (expected ${i === 1 ? `CA ${ca.name}` : 'its parent CA'})`);
    }
    if (ca.untrusted) return this.#refuse(entry, ca.untrusted.code, ca.untrusted.reason);
    if (atMs < entry.notBefore) return this.#refuse(entry, 'NOT_YET_VALID', `the certificate is valid from ${new Date(entry.notBefore).toISOString()}`);
    if (atMs > entry.notAfter) return this.#refuse(entry, 'EXPIRED', `the certificate expired at ${new Date(entry.notAfter).toISOString()}`);
    if (atMs < ca.notBefore) return this.#refuse(entry, 'NOT_YET_VALID', `CA ${ca.notBeforeCa} is valid from ${new Date(ca.notBefore).toISOString()}`);
    if (atMs > ca.notAfter) return this.#refuse(entry, 'EXPIRED', `CA ${ca.notAfterCa} expired at ${new Date(ca.notAfter).toISOString()}`);
    if (entry.revoked !== undefined) return this.#refuse(entry, 'REVOKED', `certificate ${entry.serial} of CA ${ca.name} is revoked (${entry.revoked})`);
    if (entry.kind === 'not-device') return this.#refuse(entry, 'NOT_A_DEVICE_CERTIFICATE', `certificate ${entry.serial} is a ${entry.profile} certificate, not a device's`);
    if (entry.kind === 'operator-device-profile') return this.#refuse(entry, 'UNKNOWN_DEVICE', `certificate ${entry.serial} was issued by an operator, not to a registry device`);
    const d = entry.device!;
    if (d.state === undefined) return this.#refuse(entry, 'UNKNOWN_DEVICE', `device ${d.udid} is not in the registry`);
    if (!CONNECTABLE.has(d.state)) {
      const code = d.state === 'suspended' ? 'DEVICE_SUSPENDED' : d.state === 'revoked' ? 'DEVICE_REVOKED' : 'DEVICE_DECOMMISSIONED';
      return this.#refuse(entry, code, `device ${d.udid} is ${d.state}`);
    }
    if (!d.permissions) return this.#refuse(entry, 'MALFORMED', `product ${d.product} has an invalid connection policy: ${d.policyError ?? 'unknown error'}`);
    if (entry.memo && entry.memoVersion === d.version) return entry.memo;
    entry.memo = Object.freeze({
      allowed: true, code: 'OK', reason: `device ${d.udid} (${d.state}) of tenant ${d.tenant}, product ${d.product}`,
      udid: d.udid, tenant: d.tenant, product: d.product, line: d.line, batch: d.batch, serial: entry.serial, issuer: ca.name, permissions: d.permissions,
    } satisfies Decision);
    entry.memoVersion = d.version;
    return entry.memo;
  }

  #refuse(entry: Entry, code: Exclude<DecisionCode, 'OK'>, reason: string): Decision {
    const d = entry.device;
    return {
      allowed: false, code, reason, serial: entry.serial, issuer: entry.ca.name,
      ...(d ? { udid: d.udid } : {}),
      ...(d && d.state !== undefined ? { tenant: d.tenant, product: d.product, line: d.line, batch: d.batch } : {}),
    };
  }
}

function applyDeviceRow(d: DeviceInfo, r: { state: DeviceState; tenant: string; batch_id: string; product_id: number; product: string; policy: string | null; line: string } | undefined): void {
  d.version++;
  if (!r) { d.state = undefined; d.permissions = undefined; return; }
  d.state = r.state;
  d.tenant = r.tenant;
  d.batch = r.batch_id;
  d.productId = r.product_id;
  d.product = r.product;
  d.line = r.line;
  try {
    d.permissions = permissionsFor(parsePolicy(r.policy), d.udid);
    d.policyError = undefined;
  } catch (err) {
    d.permissions = undefined;
    d.policyError = (err as Error).message;
  }
}

function refusal(r: Refusal): Decision {
  return { allowed: false, code: r.code, reason: r.reason };
}

/** Size and shape limits, before anything is hashed or parsed. */
function checkShape(chain: readonly Buffer[]): Decision | undefined {
  if (!Array.isArray(chain) || chain.length === 0) return refusal({ code: 'MALFORMED', reason: 'no certificate was presented' });
  if (chain.length > CHAIN_LIMITS.certificates) return refusal({ code: 'MALFORMED', reason: `the chain has ${chain.length} certificates, over the limit of ${CHAIN_LIMITS.certificates}` });
  for (let i = 0; i < chain.length; i++) {
    const c = chain[i];
    if (!Buffer.isBuffer(c) || c.length === 0) return refusal({ code: 'MALFORMED', reason: `certificate #${i + 1} of the chain is empty` });
    if (c.length > CHAIN_LIMITS.certificateBytes) return refusal({ code: 'MALFORMED', reason: `certificate #${i + 1} of the chain is over ${CHAIN_LIMITS.certificateBytes} bytes` });
  }
  return undefined;
}
