// CRL publisher: keeps a full and a delta CRL (RFC 5280 §5, §5.2.4) current for every issuing CA,
// stores each one it makes in `crls` with a `crl.issue` audit entry, and hands out the latest DER.
//
//   numbering  one cRLNumber sequence per CA shared by full and delta CRLs (unique (ca_id, number));
//              the next number is taken as max+1 and re-checked inside the write transaction, so two
//              processes generating at once retry instead of colliding.
//   full       every revoked certificate of the CA, except certificates that expired more than one full
//              CRL validity period ago (RFC 5280 §3.3 / §5: an entry stays until it has appeared on a
//              regularly scheduled CRL issued after the certificate expired). nextUpdate = thisUpdate +
//              fullValidityMs (7 days); regenerated every fullEveryMs (24 h), when less than half its
//              validity remains, or when the delta has grown past deltaMaxEntries.
//   delta      the certificates revoked since its base full CRL: revoked now, not on the base, revoked_at
//              no earlier than the base's thisUpdate minus overlapMs (the overlap covers a revocation
//              whose revoked_at was stamped before the base was read but committed after it). Critical
//              deltaCRLIndicator = base number; nextUpdate = thisUpdate + deltaValidityMs (1 day).
//              Regenerated at once (debounced by debounceMs) on the authority's 'revoked' event, after
//              every new full CRL, and when less than half its validity remains.
//   freshness  a timer (unref'd, every checkEveryMs) regenerates what is stale and notices revocations
//              and CRLs made by other processes (a count of revoked rows; the latest stored number).
//   hold       a suspended device's certificates (status valid, unexpired) are on hold (RFC 5280 §5.3.1
//              certificateHold, revocation time = the device's updated_at, i.e. its suspension): a full
//              CRL lists them beside the revoked ones; a delta lists those put on hold since its base
//              (certificateHold) and those on hold on its base that no longer are (removeFromCRL: the
//              device was resumed, or the certificate expired). The set of held serials is compared by
//              the timer and by current(..., { recheck: true }) (the broker sync after a suspend/resume).
//
// Only issuing CAs (role intermediate, active, key online) get CRLs here; the offline root's CRL is a
// root ceremony step, and a factory station's CA (key in the station's token) gets only the CRL its token
// signed at station create (served while valid; NOT_FOUND without one).

import type { EventEmitter } from 'node:events';
import { appendAudit } from '../audit/audit-log.js';
import { HallmarkError } from '../errors.js';
import { sql, type SqlBool } from 'kysely';
import { RevokedListWriter, encodeCrl, parseCrl, type CrlEntry } from '../protocols/crl/crl.js';
import { nowIso, type Store } from '../store/database.js';
import type { CaRow } from '../store/schema.js';
import type { CaDirectory } from './ca-directory.js';
import type { SigningCa } from './certificate-signer.js';
import type { RevokedEvent } from './revocation.js';

export type CrlKind = 'full' | 'delta';

export interface CrlRecord {
  readonly ca: string;
  readonly caId: number;
  readonly number: number;
  readonly kind: CrlKind;
  /** Delta CRLs: the number of their base full CRL. */
  readonly baseNumber: number | null;
  readonly thisUpdate: Date;
  readonly nextUpdate: Date;
  readonly entries: number;
  readonly der: Buffer;
}

export interface CrlPublisherOptions {
  /** Full CRL nextUpdate - thisUpdate. Default 7 days. */
  readonly fullValidityMs?: number;
  /** Delta CRL nextUpdate - thisUpdate. Default 1 day. */
  readonly deltaValidityMs?: number;
  /** A full CRL is regenerated at least this often. Default 24 h. */
  readonly fullEveryMs?: number;
  /** A delta CRL longer than this makes a new full CRL instead. Default 1000. */
  readonly deltaMaxEntries?: number;
  /** Coalescing delay after a 'revoked' event before the delta is regenerated. Default 20 ms. */
  readonly debounceMs?: number;
  /** Freshness timer period; 0 disables the timer. Default 60 s. */
  readonly checkEveryMs?: number;
  /** How far before its base's thisUpdate a delta still looks for revocations. Default 10 min. */
  readonly overlapMs?: number;
  /** Public base URL (http://pki.example.com); full CRLs then carry freshestCRL PUBLIC/crl/CA-delta.crl. Default: the home's publicUrl. */
  readonly publicUrl?: string;
  /** Audit actor. Default 'system'. */
  readonly actor?: string;
  /** Where background failures go. */
  readonly logger?: { warn(obj: object, msg: string): void };
  /** Clock, for tests. */
  readonly now?: () => Date;
}

/** What the publisher needs of an Authority (a read-only CLI passes a stand-in whose signingCa refuses). */
export interface CrlSource {
  readonly store: Store;
  readonly directory: CaDirectory;
  readonly events: EventEmitter;
  readonly config: { readonly publicUrl?: string };
  signingCa(name: string): Promise<SigningCa>;
}

const HOUR = 3_600_000;
/** Rows read per query when a full CRL is made. */
const FULL_PAGE_ROWS = 10_000;
const DAY = 24 * HOUR;

interface CaState {
  readonly name: string;
  readonly caId: number;
  full?: CrlRecord;
  /**
   * Serials on `full` that a delta could list again: those revoked no earlier than the delta's cutoff
   * (full thisUpdate - overlapMs). A delta lists what is revoked since the cutoff and not on its base, so
   * older entries never matter (keeping all of a 1M-entry CRL's serials would cost ~100 MB).
   */
  fullSerials?: ReadonlySet<string>;
  delta?: CrlRecord;
  /** Revoked rows the delta query matched when `delta` was made (change detection). */
  deltaCandidates?: number;
  /** Serials on hold (certificateHold) on `full`. */
  fullHeld?: ReadonlySet<string>;
  /** The held serials (sorted, joined) when `delta` was made (change detection). */
  deltaHeldKey?: string;
}

interface HeldRow { readonly serial: string; readonly at: string }

const heldKey = (rows: readonly HeldRow[]): string => rows.map((r) => r.serial).sort().join(',');

class NumberTaken extends Error {}

const toRecord = (ca: string, row: { ca_id: number; number: number; kind: CrlKind; base_number: number | null; this_update: string; next_update: string; entries: number; der: Buffer | Uint8Array }): CrlRecord => ({
  ca,
  caId: row.ca_id,
  number: Number(row.number),
  kind: row.kind,
  baseNumber: row.base_number === null ? null : Number(row.base_number),
  thisUpdate: new Date(row.this_update),
  nextUpdate: new Date(row.next_update),
  entries: Number(row.entries),
  der: Buffer.from(row.der),
});

/** Why a CA gets no CRL here, or undefined when it does. */
export function crlIneligibility(row: CaRow, now = new Date()): HallmarkError | undefined {
  if (row.role === 'root') return new HallmarkError('NOT_FOUND', `no CRL is published here for the offline root ${row.name}: the root's CRL is made in the root ceremony`);
  // A factory station's CA (src/authority/station.ts): its key is in the station's token, so no CRL can be
  // signed for it online. Its revoked devices are refused through the registry (the connection checker).
  if (row.status === 'active' && row.certificate_der && !row.key_ref) return new HallmarkError('NOT_FOUND', `no CRL is published for CA ${row.name}: its key is offline (a factory station's token), so its CRL cannot be signed here; its revoked devices are refused through the registry`);
  if (row.status !== 'active' || !row.certificate_der || !row.key_ref) return new HallmarkError('CA_NOT_ACTIVE', `CA ${row.name} is ${row.status}: only active issuing CAs publish CRLs`);
  if (row.not_after && new Date(row.not_after) <= now) return new HallmarkError('CA_NOT_ACTIVE', `CA ${row.name} has expired`);
  return undefined;
}

export class CrlPublisher {
  readonly #source: CrlSource;
  readonly #o: Required<Omit<CrlPublisherOptions, 'logger' | 'publicUrl'>> & Pick<CrlPublisherOptions, 'logger' | 'publicUrl'>;
  readonly #states = new Map<string, CaState>();
  readonly #locks = new Map<string, Promise<unknown>>();
  readonly #dirty = new Set<string>();
  readonly #debounces = new Map<string, NodeJS.Timeout>();
  #timer: NodeJS.Timeout | undefined;
  #stopped = false;
  readonly #onRevoked = (event: RevokedEvent): void => this.#revoked(event);

  constructor(source: CrlSource, options: CrlPublisherOptions = {}) {
    this.#source = source;
    this.#o = {
      fullValidityMs: options.fullValidityMs ?? 7 * DAY,
      deltaValidityMs: options.deltaValidityMs ?? DAY,
      fullEveryMs: options.fullEveryMs ?? DAY,
      deltaMaxEntries: options.deltaMaxEntries ?? 1000,
      debounceMs: options.debounceMs ?? 20,
      checkEveryMs: options.checkEveryMs ?? 60_000,
      overlapMs: options.overlapMs ?? 10 * 60_000,
      actor: options.actor ?? 'system',
      now: options.now ?? (() => new Date()),
      logger: options.logger,
      publicUrl: (options.publicUrl ?? source.config.publicUrl)?.replace(/\/+$/, ''),
    };
    source.events.on('revoked', this.#onRevoked);
    if (this.#o.checkEveryMs > 0) {
      this.#timer = setInterval(() => { void this.refreshAll(); }, this.#o.checkEveryMs);
      this.#timer.unref();
    }
  }

  /**
   * The latest CRL of `kind` for CA `caName`, generated first when there is none or it is stale. With
   * `recheck`, the store is first looked at for changes this process was not told of (revocations and
   * CRLs by other processes, devices suspended or resumed), as the freshness timer does.
   */
  async current(caName: string, kind: CrlKind = 'full', options: { readonly recheck?: boolean } = {}): Promise<CrlRecord> {
    if (this.#stopped) throw new HallmarkError('INTERNAL', 'the CRL publisher has been stopped');
    const stored = await this.#offlineKeyCrl(caName, kind);
    if (stored) return stored;
    return this.#locked(caName, async () => {
      if (options.recheck) {
        const known = this.#states.get(caName);
        if (known) await this.#detectChanges(known);
      }
      const state = await this.#state(caName);
      await this.#freshen(state);
      return kind === 'full' ? state.full! : state.delta!;
    });
  }

  /**
   * A CA whose key is not online (a factory station's, src/authority/station.ts) cannot get a CRL signed
   * here: its latest stored CRL (the one its token signed at station create) is served while it is valid.
   */
  async #offlineKeyCrl(caName: string, kind: CrlKind): Promise<CrlRecord | undefined> {
    const row = await this.#source.directory.caRow(caName);
    if (row.role === 'root' || row.status !== 'active' || !row.certificate_der || row.key_ref) return undefined;
    const stored = kind === 'full'
      ? await this.#source.store.db.selectFrom('crls').selectAll().where('ca_id', '=', row.id).where('kind', '=', 'full').orderBy('number', 'desc').limit(1).executeTakeFirst()
      : undefined;
    if (!stored || new Date(stored.next_update) <= this.#o.now()) throw crlIneligibility(row, this.#o.now())!;
    return toRecord(caName, stored);
  }

  /** Makes a new full CRL (and its delta) now, whatever the schedule says. */
  async regenerate(caName: string): Promise<{ full: CrlRecord; delta: CrlRecord }> {
    return this.#locked(caName, async () => {
      const state = await this.#state(caName);
      await this.#makeFull(state);
      await this.#makeDelta(state);
      return { full: state.full!, delta: state.delta! };
    });
  }

  /**
   * Brings every CA that has CRLs up to date: stale CRLs, revocations and CRLs made by other processes.
   * Run by the timer; failures are logged, never thrown.
   */
  async refreshAll(): Promise<void> {
    if (this.#stopped) return;
    try {
      const cas = await this.#source.store.db.selectFrom('certificate_authorities').selectAll().where('role', '=', 'intermediate').execute();
      const withCrls = new Set((await this.#source.store.db.selectFrom('crls').select('ca_id').distinct().execute()).map((r) => Number(r.ca_id)));
      for (const row of cas) {
        if (this.#stopped) return;
        if (crlIneligibility(row, this.#o.now()) || (!this.#states.has(row.name) && !withCrls.has(row.id))) continue;
        await this.#locked(row.name, async () => {
          const known = this.#states.get(row.name);
          if (known) await this.#detectChanges(known);
          await this.#freshen(await this.#state(row.name));
        }).catch((err: unknown) => this.#o.logger?.warn({ err, ca: row.name }, 'CRL refresh failed'));
      }
    } catch (err) {
      this.#o.logger?.warn({ err }, 'CRL refresh failed');
    }
  }

  /** Stops the timer and event listener and waits for CRLs being made. */
  async stop(): Promise<void> {
    this.#stopped = true;
    if (this.#timer) clearInterval(this.#timer);
    for (const t of this.#debounces.values()) clearTimeout(t);
    this.#debounces.clear();
    this.#source.events.off('revoked', this.#onRevoked);
    await Promise.allSettled([...this.#locks.values()]);
  }

  // ------------------------------------------------------------ internals

  #revoked(event: RevokedEvent): void {
    if (this.#stopped) return;
    this.#dirty.add(event.issuer);
    if (this.#debounces.has(event.issuer)) return; // coalesced with the revocations already waiting
    const t = setTimeout(() => {
      this.#debounces.delete(event.issuer);
      if (this.#stopped) return;
      this.current(event.issuer, 'delta').catch((err: unknown) => {
        // A CA that publishes no CRL here (the offline root, a factory station's CA): nothing to update.
        if (err instanceof HallmarkError && err.code === 'NOT_FOUND') return;
        this.#o.logger?.warn({ err, ca: event.issuer }, 'delta CRL after revocation failed');
      });
    }, this.#o.debounceMs);
    t.unref();
    this.#debounces.set(event.issuer, t);
  }

  /** Runs `fn` after every earlier call for the same CA (one generation at a time per CA). */
  #locked<T>(caName: string, fn: () => Promise<T>): Promise<T> {
    const previous = this.#locks.get(caName) ?? Promise.resolve();
    const run = previous.then(fn, fn);
    const tail = run.catch(() => undefined);
    this.#locks.set(caName, tail);
    void tail.then(() => { if (this.#locks.get(caName) === tail) this.#locks.delete(caName); });
    return run;
  }

  async #state(caName: string): Promise<CaState> {
    const row = await this.#source.directory.caRow(caName);
    const refusal = crlIneligibility(row, this.#o.now());
    if (refusal) {
      this.#states.delete(caName);
      throw refusal;
    }
    const known = this.#states.get(caName);
    if (known && known.caId === row.id) return known;
    const state: CaState = { name: caName, caId: row.id };
    const db = this.#source.store.db;
    const latest = (kind: CrlKind) => db.selectFrom('crls').selectAll().where('ca_id', '=', row.id).where('kind', '=', kind).orderBy('number', 'desc').limit(1).executeTakeFirst();
    const [full, delta] = await Promise.all([latest('full'), latest('delta')]);
    if (full) {
      state.full = toRecord(caName, full);
      // CRL times are whole seconds: an entry whose true revoked_at is at or after the cutoff shows at most 999 ms earlier.
      const since = state.full.thisUpdate.getTime() - this.#o.overlapMs - 1000;
      const parsed = parseCrl(state.full.der).entries;
      // certificateHold entries of certificates that are not revoked in the store are holds (a suspended device's).
      const holdSerials = parsed.filter((e) => e.reason === 'certificateHold').map((e) => e.serialHex);
      const held = new Set<string>();
      for (let i = 0; i < holdSerials.length; i += 500) {
        const rows = await db.selectFrom('certificates').select('serial').where('issuer_id', '=', row.id)
          .where('serial', 'in', holdSerials.slice(i, i + 500)).where('status', '!=', 'revoked').execute();
        for (const r of rows) held.add(r.serial);
      }
      state.fullHeld = held;
      state.fullSerials = new Set(parsed.filter((e) => e.revokedAt.getTime() >= since && !held.has(e.serialHex)).map((e) => e.serialHex));
    }
    if (delta && state.full && Number(delta.base_number) === state.full.number) {
      state.delta = toRecord(caName, delta);
      // Revocations, suspensions and resumptions made while no publisher was watching (another process, a
      // restart) make it stale: the stored delta is compared entry by entry with what it should list.
      const { entries, candidates, heldKey: hk } = await this.#deltaEntries(state);
      const listed = new Set(parseCrl(state.delta.der).entries.map((e) => `${e.serialHex}/${e.reason}`));
      const same = entries.length === listed.size && entries.every((e) => listed.has(`${e.serialHex}/${!e.reason ? 'unspecified' : e.reason}`));
      if (same) { state.deltaCandidates = candidates; state.deltaHeldKey = hk; }
      else this.#dirty.add(caName);
    }
    this.#states.set(caName, state);
    return state;
  }

  /** Marks the delta stale when revocations or newer CRLs appeared behind this process's back. */
  async #detectChanges(state: CaState): Promise<void> {
    const db = this.#source.store.db;
    const newest = await db.selectFrom('crls').select((eb) => eb.fn.max('number').as('n')).where('ca_id', '=', state.caId).executeTakeFirst();
    const mine = Math.max(state.full?.number ?? 0, state.delta?.number ?? 0);
    if (newest?.n !== null && newest?.n !== undefined && Number(newest.n) > mine) {
      this.#states.delete(state.name); // another process made CRLs: reload the latest
      return;
    }
    if (!state.full || !state.delta || state.deltaCandidates === undefined) return;
    const counted = await db.selectFrom('certificates').select((eb) => eb.fn.countAll().as('n'))
      .where('issuer_id', '=', state.caId).where('status', '=', 'revoked').where('revoked_at', '>=', this.#deltaCutoff(state.full)).executeTakeFirstOrThrow();
    if (Number(counted.n) !== state.deltaCandidates) this.#dirty.add(state.name);
    else if (heldKey(await this.#heldRows(state.caId)) !== state.deltaHeldKey) this.#dirty.add(state.name);
  }

  /** The certificates of CA `caId` on hold: valid, unexpired, of a suspended device (suspended at `at`). */
  async #heldRows(caId: number): Promise<HeldRow[]> {
    // devices_state (state) finds the suspended devices, certificates_device their certificates.
    const rows = await this.#source.store.db.selectFrom('devices').innerJoin('certificates', 'certificates.device_udid', 'devices.udid')
      .select(['certificates.serial as serial', 'devices.updated_at as at'])
      .where('devices.state', '=', 'suspended').where('certificates.issuer_id', '=', caId)
      .where('certificates.status', '=', 'valid').where('certificates.not_after', '>', nowIso(this.#o.now()))
      .orderBy('certificates.id').execute();
    return rows;
  }

  async #freshen(state: CaState): Promise<void> {
    const now = this.#o.now().getTime();
    const halfGone = (r: CrlRecord): boolean => r.nextUpdate.getTime() - now < (r.nextUpdate.getTime() - r.thisUpdate.getTime()) / 2;
    const full = state.full;
    if (!full || now - full.thisUpdate.getTime() >= this.#o.fullEveryMs || halfGone(full)) {
      await this.#makeFull(state);
      await this.#makeDelta(state);
      return;
    }
    const delta = state.delta;
    if (!delta || delta.baseNumber !== full.number || this.#dirty.has(state.name) || halfGone(delta)) await this.#makeDelta(state);
  }

  #deltaCutoff(full: CrlRecord): string {
    return nowIso(new Date(full.thisUpdate.getTime() - this.#o.overlapMs));
  }

  async #deltaEntries(state: CaState): Promise<{ entries: CrlEntry[]; candidates: number; heldKey: string }> {
    const db = this.#source.store.db;
    const rows = await db.selectFrom('certificates').select(['serial', 'revoked_at', 'revocation_reason'])
      .where('issuer_id', '=', state.caId).where('status', '=', 'revoked').where('revoked_at', '>=', this.#deltaCutoff(state.full!))
      .orderBy('id').execute();
    const onBase = state.fullSerials ?? new Set<string>();
    const entries: CrlEntry[] = rows.filter((r) => !onBase.has(r.serial)).map((r) => ({ serialHex: r.serial, revokedAt: new Date(r.revoked_at!), reason: r.revocation_reason }));
    // Holds (RFC 5280 §5.3.1): put on hold since the base -> certificateHold; on hold on the base and no
    // longer (resumed, expired) -> removeFromCRL, unless revoked meanwhile (then listed as revoked above).
    const held = await this.#heldRows(state.caId);
    const heldNow = new Set(held.map((r) => r.serial));
    const baseHeld = state.fullHeld ?? new Set<string>();
    for (const r of held) if (!baseHeld.has(r.serial)) entries.push({ serialHex: r.serial, revokedAt: new Date(r.at), reason: 'certificateHold' });
    const listed = new Set(entries.map((e) => e.serialHex));
    const released = [...baseHeld].filter((s) => !heldNow.has(s) && !listed.has(s));
    if (released.length > 0) {
      const at = this.#thisUpdate();
      for (let i = 0; i < released.length; i += 500) {
        const chunk = released.slice(i, i + 500);
        const revoked = new Map((await db.selectFrom('certificates').select(['serial', 'revoked_at', 'revocation_reason'])
          .where('issuer_id', '=', state.caId).where('serial', 'in', chunk).where('status', '=', 'revoked').execute()).map((r) => [r.serial, r]));
        for (const s of chunk) {
          const r = revoked.get(s);
          entries.push(r ? { serialHex: s, revokedAt: new Date(r.revoked_at ?? 0), reason: r.revocation_reason } : { serialHex: s, revokedAt: at, reason: 'removeFromCRL' });
        }
      }
    }
    return { entries, candidates: rows.length, heldKey: heldKey(held) };
  }

  async #makeFull(state: CaState): Promise<void> {
    const thisUpdate = this.#thisUpdate();
    // Kept until one full validity period after expiry (see the header comment).
    const keepExpiredSince = nowIso(new Date(thisUpdate.getTime() - this.#o.fullValidityMs));
    const cutoff = nowIso(new Date(thisUpdate.getTime() - this.#o.overlapMs)); // the cutoff of the deltas on this base
    const db = this.#source.store.db;
    // Streamed page by page into the encoder, in (revoked_at, id) order: a range scan of the
    // (issuer_id, status, revoked_at) index, resumed after the last row of the previous page. One
    // 1M-row result would hold every row as an object at once (≈ 400 MB, and SQLite sorted it first),
    // and between pages other queries of a running server get the connection.
    const writer = new RevokedListWriter(1024);
    const recent = new Set<string>();
    const base = () => db.selectFrom('certificates').select(['id', 'serial', 'revoked_at', 'revocation_reason'])
      .where('issuer_id', '=', state.caId).where('status', '=', 'revoked').where('not_after', '>=', keepExpiredSince);
    // A revoked row without a time (never written so) still goes on the CRL, dated 1970 as before.
    for (const r of await base().where('revoked_at', 'is', null).orderBy('id').execute()) writer.add(r.serial, new Date(0), r.revocation_reason);
    let after: { revokedAt: string; id: number } | undefined;
    for (;;) {
      let q = base().where('revoked_at', 'is not', null);
      if (after) q = q.where(sql<SqlBool>`(revoked_at, id) > (${after.revokedAt}, ${after.id})`);
      const rows = await q.orderBy('revoked_at').orderBy('id').limit(FULL_PAGE_ROWS).execute();
      for (const r of rows) {
        writer.add(r.serial, r.revoked_at!, r.revocation_reason);
        if (r.revoked_at! >= cutoff) recent.add(r.serial);
      }
      if (rows.length < FULL_PAGE_ROWS) break;
      const last = rows[rows.length - 1]!;
      after = { revokedAt: last.revoked_at!, id: Number(last.id) };
    }
    // Certificates on hold (a suspended device's): certificateHold, dated when the device was suspended.
    const held = await this.#heldRows(state.caId);
    for (const r of held) writer.add(r.serial, r.at, 'certificateHold');
    const freshestCrlUrl = this.#o.publicUrl ? `${this.#o.publicUrl}/crl/${state.name}-delta.crl` : undefined;
    state.full = await this.#issue(state, 'full', thisUpdate, writer, { freshestCrlUrl });
    state.fullSerials = recent;
    state.fullHeld = new Set(held.map((r) => r.serial));
    state.delta = undefined;
    state.deltaCandidates = undefined;
    state.deltaHeldKey = undefined;
  }

  async #makeDelta(state: CaState): Promise<void> {
    this.#dirty.delete(state.name); // before reading: a revocation from now on marks it again
    const { entries, candidates, heldKey: hk } = await this.#deltaEntries(state);
    if (entries.length > this.#o.deltaMaxEntries) {
      await this.#makeFull(state);
      return this.#makeDelta(state);
    }
    state.delta = await this.#issue(state, 'delta', this.#thisUpdate(), entries, { deltaBase: state.full!.number });
    state.deltaCandidates = candidates;
    state.deltaHeldKey = hk;
  }

  #thisUpdate(): Date {
    return new Date(Math.floor(this.#o.now().getTime() / 1000) * 1000);
  }

  /** Signs and stores one CRL under the next number, with its audit entry, retrying if another writer took the number. */
  async #issue(state: CaState, kind: CrlKind, thisUpdate: Date, entries: readonly CrlEntry[] | RevokedListWriter, extra: { deltaBase?: number; freshestCrlUrl?: string }): Promise<CrlRecord> {
    const ca = await this.#source.signingCa(state.name);
    const db = this.#source.store.db;
    const maxNumber = async (q: typeof db): Promise<number> => {
      const r = await q.selectFrom('crls').select((eb) => eb.fn.max('number').as('n')).where('ca_id', '=', state.caId).executeTakeFirst();
      return r?.n === null || r?.n === undefined ? 0 : Number(r.n);
    };
    const nextUpdate = new Date(thisUpdate.getTime() + (kind === 'full' ? this.#o.fullValidityMs : this.#o.deltaValidityMs));
    const count = entries instanceof RevokedListWriter ? entries.count : entries.length;
    for (let attempt = 0; ; attempt++) {
      const last = await maxNumber(db);
      const number = last + 1;
      const der = await encodeCrl({
        issuer: ca.subject, issuerKeyId: ca.keyId, scheme: ca.scheme, thisUpdate, nextUpdate, number,
        deltaBase: kind === 'delta' ? extra.deltaBase : undefined,
        freshestCrlUrl: kind === 'full' ? extra.freshestCrlUrl : undefined,
        entries,
      }, (tbs) => ca.signer.sign(tbs));
      try {
        await this.#source.store.writeTransaction(async (trx) => {
          if ((await maxNumber(trx as unknown as typeof db)) !== last) throw new NumberTaken();
          await trx.insertInto('crls').values({
            ca_id: state.caId, number, kind, base_number: kind === 'delta' ? extra.deltaBase! : null,
            this_update: nowIso(thisUpdate), next_update: nowIso(nextUpdate), entries: count, der, created_at: nowIso(),
          }).execute();
          await appendAudit(trx, [{
            actor: this.#o.actor, action: 'crl.issue', target: state.name,
            details: { ca: state.name, number, kind, entries: count, ...(kind === 'delta' ? { baseNumber: extra.deltaBase } : {}) },
          }]);
        });
      } catch (err) {
        if (err instanceof NumberTaken && attempt < 5) continue;
        if (err instanceof NumberTaken) throw new HallmarkError('INTERNAL', `could not allocate a CRL number for ${state.name}`);
        throw err;
      }
      return { ca: state.name, caId: state.caId, number, kind, baseNumber: kind === 'delta' ? extra.deltaBase! : null, thisUpdate, nextUpdate, entries: count, der };
    }
  }
}
