// The device registry: products, production lines, batches (the unit of quota), tenants and
// devices with their hardware keys. It decides who may become a device; the authority asks it
// before anything is signed. Every change is an audit entry in the same transaction.

import * as nodeCrypto from 'node:crypto';
import { createHash, randomBytes } from 'node:crypto';
import { CompiledQuery, sql, type Transaction } from 'kysely';
import { appendAudit, type AuditEvent } from '../audit/audit-log.js';
import { HallmarkError } from '../errors.js';
import { publicKeyFromSpki } from '../pki/algorithms.js';
import { isP256Point, isP256Spki } from '../pki/p256.js';
import { Store, nowIso, type Dialect } from '../store/database.js';
import { rawSql } from '../store/raw-sql.js';
import type { BatchRow, Database, DeviceRow, DeviceState } from '../store/schema.js';
import { profileByName } from '../authority/profiles.js';

export const DEFAULT_TENANT = 'default';
const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;
// At most 32 bytes: the default UDID (SHA-256) fits a certificate's CN (64 characters).
const UDID = /^[0-9a-f]{2,64}$/;

export function checkName(kind: string, name: string): string {
  if (!NAME.test(name)) throw new HallmarkError('BAD_REQUEST', `${kind} names are 1-63 letters, digits, dot, dash or underscore: ${JSON.stringify(name)}`);
  return name;
}

/** Default UDID: hex SHA-256 of the SPKI DER of the hardware key. */
export function udidOfKey(spki: Buffer): string {
  return sha256Hex(spki);
}

// crypto.hash (Node >= 20.12): a one-shot digest without a Hash object, several times cheaper for small inputs.
const oneShot = (nodeCrypto as { hash?: (algorithm: string, data: Buffer, encoding: 'hex') => string }).hash;
const sha256Hex: (data: Buffer) => string = typeof oneShot === 'function'
  ? (data) => oneShot('sha256', data, 'hex')
  : (data) => createHash('sha256').update(data).digest('hex');

export function normaliseUdid(udid: string): string {
  const u = udid.toLowerCase().replace(/[:\s-]/g, '');
  if (!UDID.test(u) || u.length % 2) throw new HallmarkError('BAD_REQUEST', `a UDID is 1-32 bytes of hex: ${JSON.stringify(udid)}`);
  return u;
}

/** Allowed state changes (DESIGN.md): suspend/resume only between active-ish states; revoke/decommission from anywhere. */
const TRANSITIONS: Readonly<Record<'suspend' | 'resume' | 'decommission' | 'revoke', { from: readonly DeviceState[]; to: DeviceState }>> = {
  suspend: { from: ['provisioned', 'active'], to: 'suspended' },
  resume: { from: ['suspended'], to: 'active' },
  revoke: { from: ['registered', 'provisioned', 'active', 'suspended'], to: 'revoked' },
  decommission: { from: ['registered', 'provisioned', 'active', 'suspended', 'revoked'], to: 'decommissioned' },
};
export type DeviceAction = keyof typeof TRANSITIONS;

export interface DeviceInfo {
  readonly udid: string;
  readonly serialNumber: string | null;
  readonly state: DeviceState;
  readonly product: string;
  readonly line: string;
  readonly batch: string;
  readonly tenant: string;
  readonly publicKeySha256: string;
  readonly hasBirthCertificate: boolean;
  readonly createdAt: string;
  readonly updatedAt: string;
  readonly provisionedAt: string | null;
}

export interface BatchInfo {
  readonly id: string;
  readonly product: string;
  readonly line: string;
  readonly quota: number;
  readonly issued: number;
  readonly refused: number;
  readonly registered: number;
  readonly allowUnregistered: boolean;
  readonly requireApproval: boolean;
  readonly expiresAt: string | null;
  readonly createdAt: string;
}

/** A device to register; the public key is SPKI DER. */
export interface DeviceRegistration {
  readonly publicKeySpki: Buffer;
  readonly udid?: string;
  readonly serialNumber?: string;
  readonly birthCertificate?: Buffer;
  /** Intermediate certificates between the birth certificate and a vendor CA (e.g. a manifest's x5c). */
  readonly birthCertificateChain?: readonly Buffer[];
  readonly tenant?: string;
}

/** Devices to register, in input order: an array, or any list read by index like one (bulk imports keep a compact one). */
export interface DeviceRegistrationList {
  readonly length: number;
  at(index: number): DeviceRegistration | undefined;
}

export type RegistrationOutcome = 'registered' | 'unchanged' | 're-registered';

/** Verifies a birth certificate for a device key; provided by birth-certificates.ts. */
export type BirthCertificateCheck = (trx: Transaction<Database>, certificate: Buffer, publicKeySpki: Buffer, at: Date, intermediates: readonly Buffer[]) => Promise<void>;

export class Registry {
  readonly store: Store;
  readonly #birthCheck?: BirthCertificateCheck;

  constructor(store: Store, birthCheck?: BirthCertificateCheck) {
    this.store = store;
    this.#birthCheck = birthCheck;
  }

  /** Records a refusal (clone, quota) in the audit log after the refused transaction rolled back. */
  async #auditRefusal(event: AuditEvent, counter?: (trx: Transaction<Database>) => Promise<void>): Promise<void> {
    await this.store.writeTransaction(async (trx) => {
      if (counter) await counter(trx);
      await appendAudit(trx, [event]);
    });
  }

  // ------------------------------------------------------------ products, lines, batches, tenants

  /**
   * allowServerKeygen: EST serverkeygen may make this product's device keys (for devices that cannot).
   * allowRekey: a device's operational key may differ from its registered hardware key (rekey).
   */
  async createProduct(options: { name: string; profile?: string; validityDays?: number; allowServerKeygen?: boolean; allowRekey?: boolean; renewAfterPercent?: number; actor: string }): Promise<void> {
    const renewAfter = options.renewAfterPercent ?? 0;
    if (!Number.isInteger(renewAfter) || renewAfter < 0 || renewAfter > 99) throw new HallmarkError('BAD_REQUEST', 'the renewal window opens after 0..99 % of the lifetime');
    const name = checkName('product', options.name);
    const profile = profileByName(options.profile ?? 'device');
    if (profile.ca) throw new HallmarkError('PROFILE_VIOLATION', 'a product profile cannot be a CA profile');
    const days = options.validityDays ?? profile.defaultValidityDays;
    if (!Number.isInteger(days) || days < 1 || days > profile.maxValidityDays) throw new HallmarkError('PROFILE_VIOLATION', `validity must be 1..${profile.maxValidityDays} days for profile ${profile.name}`);
    await this.store.writeTransaction(async (trx) => {
      if (await trx.selectFrom('products').select('id').where('name', '=', name).executeTakeFirst()) throw new HallmarkError('ALREADY_EXISTS', `product ${name} already exists`);
      const allowServerKeygen = options.allowServerKeygen ? 1 : 0;
      const allowRekey = options.allowRekey ? 1 : 0;
      await trx.insertInto('products').values({ name, profile: profile.name, validity_days: days, created_at: nowIso(), allow_server_keygen: allowServerKeygen, allow_rekey: allowRekey, renew_after_percent: renewAfter }).execute();
      await appendAudit(trx, [{ actor: options.actor, action: 'product.create', target: name, details: { profile: profile.name, validityDays: days, allowServerKeygen: !!allowServerKeygen, allowRekey: !!allowRekey, renewAfterPercent: renewAfter } }]);
    });
  }

  async listProducts(): Promise<{ name: string; profile: string; validityDays: number; allowServerKeygen: boolean; allowRekey: boolean; renewAfterPercent: number; createdAt: string }[]> {
    const rows = await this.store.db.selectFrom('products').selectAll().orderBy('name').execute();
    return rows.map((r) => ({ name: r.name, profile: r.profile, validityDays: r.validity_days, allowServerKeygen: !!Number(r.allow_server_keygen), allowRekey: !!Number(r.allow_rekey), renewAfterPercent: Number(r.renew_after_percent), createdAt: r.created_at }));
  }

  async createLine(options: { name: string; ca: string; actor: string }): Promise<void> {
    const name = checkName('line', options.name);
    await this.store.writeTransaction(async (trx) => {
      if (await trx.selectFrom('lines').select('id').where('name', '=', name).executeTakeFirst()) throw new HallmarkError('ALREADY_EXISTS', `line ${name} already exists`);
      const ca = await trx.selectFrom('certificate_authorities').select(['id', 'role', 'status']).where('name', '=', options.ca).executeTakeFirst();
      if (!ca) throw new HallmarkError('CA_NOT_FOUND', `no CA named ${options.ca}`);
      if (ca.role === 'root') throw new HallmarkError('CA_NOT_ACTIVE', 'a line issues under an intermediate CA, never the offline root');
      await trx.insertInto('lines').values({ name, ca_id: ca.id, created_at: nowIso() }).execute();
      await appendAudit(trx, [{ actor: options.actor, action: 'line.create', target: name, details: { ca: options.ca, caStatus: ca.status } }]);
    });
  }

  async listLines(): Promise<{ name: string; ca: string; caStatus: string; refusedIssuances: number; createdAt: string }[]> {
    const rows = await this.store.db.selectFrom('lines').innerJoin('certificate_authorities as ca', 'ca.id', 'lines.ca_id')
      .select(['lines.name', 'ca.name as ca', 'ca.status as caStatus', 'lines.refused_issuances', 'lines.created_at']).orderBy('lines.name').execute();
    return rows.map((r) => ({ name: r.name, ca: r.ca, caStatus: r.caStatus, refusedIssuances: Number(r.refused_issuances), createdAt: r.created_at }));
  }

  /** requireApproval: each device's first enrolment waits for an operator (hallmark enrolment approve). */
  async createBatch(options: { product: string; line: string; quota: number; expiresAt?: Date; allowUnregistered?: boolean; requireApproval?: boolean; actor: string }): Promise<string> {
    if (!Number.isInteger(options.quota) || options.quota < 0 || options.quota > 100_000_000) throw new HallmarkError('BAD_REQUEST', 'the quota must be a whole number from 0 to 100,000,000');
    if (options.expiresAt && options.expiresAt <= new Date()) throw new HallmarkError('BAD_REQUEST', 'the batch expiry must be in the future');
    const id = `b-${randomBytes(6).toString('hex')}`;
    await this.store.writeTransaction(async (trx) => {
      const product = await trx.selectFrom('products').select('id').where('name', '=', options.product).executeTakeFirst();
      if (!product) throw new HallmarkError('PRODUCT_NOT_FOUND', `no product named ${options.product}`);
      const line = await trx.selectFrom('lines').select('id').where('name', '=', options.line).executeTakeFirst();
      if (!line) throw new HallmarkError('LINE_NOT_FOUND', `no line named ${options.line}`);
      await trx.insertInto('batches').values({
        id, product_id: product.id, line_id: line.id, quota: options.quota, allow_unregistered: options.allowUnregistered ? 1 : 0,
        require_approval: options.requireApproval ? 1 : 0, expires_at: options.expiresAt ? nowIso(options.expiresAt) : null, created_at: nowIso(),
      }).execute();
      await appendAudit(trx, [{ actor: options.actor, action: 'batch.create', target: id, details: { product: options.product, line: options.line, quota: options.quota, expiresAt: options.expiresAt?.toISOString() ?? null, allowUnregistered: !!options.allowUnregistered, requireApproval: !!options.requireApproval } }]);
    });
    return id;
  }

  async batch(id: string): Promise<BatchInfo> {
    const rows = await this.#batchQuery().where('batches.id', '=', id).execute();
    if (!rows[0]) throw new HallmarkError('BATCH_NOT_FOUND', `no batch ${JSON.stringify(id)}`);
    return this.#batchInfo(rows[0]);
  }

  async listBatches(): Promise<BatchInfo[]> {
    return (await this.#batchQuery().orderBy('batches.created_at').execute()).map((r) => this.#batchInfo(r));
  }

  #batchQuery() {
    return this.store.db.selectFrom('batches')
      .innerJoin('products', 'products.id', 'batches.product_id')
      .innerJoin('lines', 'lines.id', 'batches.line_id')
      .select((eb) => [
        'batches.id', 'products.name as product', 'lines.name as line', 'batches.quota', 'batches.issued_count', 'batches.refused_count',
        'batches.allow_unregistered', 'batches.require_approval', 'batches.expires_at', 'batches.created_at',
        eb.selectFrom('devices').select((e) => e.fn.countAll<number>().as('n')).whereRef('devices.batch_id', '=', 'batches.id').as('registered'),
      ]);
  }

  #batchInfo(r: { id: string; product: string; line: string; quota: number; issued_count: number; refused_count: number; allow_unregistered: number; require_approval: number; expires_at: string | null; created_at: string; registered: number | null }): BatchInfo {
    return {
      id: r.id, product: r.product, line: r.line, quota: Number(r.quota), issued: Number(r.issued_count), refused: Number(r.refused_count),
      registered: Number(r.registered ?? 0), allowUnregistered: Number(r.allow_unregistered) === 1, requireApproval: Number(r.require_approval) === 1, expiresAt: r.expires_at, createdAt: r.created_at,
    };
  }

  async #ensureTenant(trx: Transaction<Database>, tenant: string): Promise<void> {
    checkName('tenant', tenant);
    const exists = await trx.selectFrom('tenants').select('name').where('name', '=', tenant).executeTakeFirst();
    if (!exists) await trx.insertInto('tenants').values({ name: tenant, created_at: nowIso() }).execute();
  }

  // ------------------------------------------------------------ devices

  /**
   * Registers devices of one batch atomically: all or none. Re-registering a device exactly as it is
   * (same UDID, key and batch) changes nothing, so imports are idempotent. A UDID or key already held by
   * another device is a clone: the whole call is refused and the attempt audited with both batches.
   *
   * Built for bulk imports (a million devices in one call): the input is read by index (an array, or a
   * compact list), only a UDID and a key hash per device are kept, and the transaction works in chunks —
   * decide each device in input order, insert the new ones in UDID order (index pages written in
   * sequence rather than at random), then audit them in input order.
   */
  async registerDevices(batchId: string, devices: DeviceRegistrationList, actor: string, source = 'device.register', summary?: (outcomes: readonly RegistrationOutcome[]) => AuditEvent | undefined): Promise<RegistrationOutcome[]> {
    const n = devices.length;
    // Every entry is checked before any is compared (a malformed entry anywhere is reported first),
    // then the first UDID or key seen twice in this input refuses the call. Kept per device: its UDID
    // and key hash (entry i of each index), and its key DER when the given one was not canonical.
    const udidIndex = new KeyIndex('hex', n);
    const keyIndex = new KeyIndex('hex', n);
    const canonical = new Map<number, Buffer>();
    const tenants = new Set<string>();
    let duplicate: HallmarkError | undefined;
    for (let i = 0; i < n; i++) {
      const given = devices.at(i)!;
      const d = prepareRegistration(given, i);
      tenants.add(d.tenant);
      if (d.publicKeySpki !== given.publicKeySpki) canonical.set(i, d.publicKeySpki);
      if (duplicate) continue;
      const dupU = udidIndex.add(d.udid);
      const dupK = keyIndex.add(d.keyHash);
      if (dupU >= 0 || dupK >= 0) duplicate = new HallmarkError('CLONE_DETECTED', `entry ${i + 1}: the same ${dupU >= 0 ? 'UDID' : 'public key'} as entry ${(dupU >= 0 ? dupU : dupK) + 1} of this input`);
    }
    if (duplicate) throw duplicate;
    const udidOf = (i: number): string => udidIndex.string(i);
    const keyHash = (i: number): string => keyIndex.string(i);
    const spkiOf = (i: number, d: DeviceRegistration): Buffer => canonical.get(i) ?? d.publicKeySpki;

    let clone: { event: AuditEvent; message: string } | undefined;
    try {
      return await this.store.writeTransaction(async (trx) => {
        const batch = await trx.selectFrom('batches').selectAll().where('id', '=', batchId).executeTakeFirst();
        if (!batch) throw new HallmarkError('BATCH_NOT_FOUND', `no batch ${JSON.stringify(batchId)}`);
        if (batch.expires_at && new Date(batch.expires_at) <= new Date()) throw new HallmarkError('BATCH_EXPIRED', `batch ${batchId} expired at ${batch.expires_at}`);
        const now = new Date();
        const outcomes = new Array<RegistrationOutcome>(n);
        const previousBatch = new Map<number, string>(); // re-registered devices: the batch they left
        for (const t of tenants) await this.#ensureTenant(trx, t);
        const restoreCache = await this.#bulkPageCache(trx, n);
        try {
          // 1. Each device in input order against the existing holders of its UDID and key (looked up
          //    chunk by chunk): the first clone or bad birth certificate refuses the whole call.
          for (let start = 0; start < n; start += LOOKUP_CHUNK) {
            const end = Math.min(n, start + LOOKUP_CHUNK);
            const chunkUdids: string[] = [];
            const chunkKeys: string[] = [];
            for (let i = start; i < end; i++) { chunkUdids.push(udidOf(i)); chunkKeys.push(keyHash(i)); }
            const existingByUdid = new Map<string, Holder>();
            const existingByKey = new Map<string, Holder>();
            for (const r of await this.#holders(trx, chunkUdids, chunkKeys)) { existingByUdid.set(r.udid, r); existingByKey.set(r.public_key_sha256, r); }
            for (let i = start; i < end; i++) {
              const udid = chunkUdids[i - start]!;
              const hash = chunkKeys[i - start]!;
              const byUdid = existingByUdid.get(udid);
              const byKey = existingByKey.get(hash);
              const holder = byUdid ?? byKey;
              if (!holder && !devices.at(i)!.birthCertificate) { outcomes[i] = 'registered'; continue; }
              const d = devices.at(i)!;
              if (holder) {
                const same = holder.udid === udid && holder.public_key_sha256 === hash;
                if (same && holder.batch_id === batchId && holder.state !== 'decommissioned') { outcomes[i] = 'unchanged'; continue; }
                if (same && holder.state === 'decommissioned') {
                  // Registered anew after end of life: back to "registered", in this batch.
                  if (d.birthCertificate && this.#birthCheck) await this.#birthCheck(trx, d.birthCertificate, spkiOf(i, d), now, d.birthCertificateChain ?? []);
                  await trx.updateTable('devices').set({
                    state: 'registered', batch_id: batchId, product_id: batch.product_id, line_id: batch.line_id, tenant: d.tenant ?? DEFAULT_TENANT, serial_number: d.serialNumber ?? null,
                    // Without a new birth certificate, the one on record stays.
                    ...(d.birthCertificate ? { birth_cert_der: d.birthCertificate } : {}), updated_at: nowIso(), provisioned_at: null,
                  }).where('udid', '=', udid).execute();
                  previousBatch.set(i, holder.batch_id);
                  outcomes[i] = 're-registered';
                  continue;
                }
                const what = byUdid && byUdid.public_key_sha256 !== hash ? 'UDID is registered with a different key' : byKey && byKey.udid !== udid ? 'public key is registered under another UDID' : 'device is registered in another batch';
                clone = {
                  message: `entry ${i + 1} (UDID ${udid}): ${what} (batch ${holder.batch_id}); refused as a possible clone`,
                  event: { actor, action: 'device.clone_refused', target: udid, details: { batch: batchId, existingBatch: holder.batch_id, existingUdid: holder.udid, reason: what, source } },
                };
                throw new HallmarkError('CLONE_DETECTED', clone.message);
              }
              if (!this.#birthCheck) throw new HallmarkError('BIRTH_CERT_INVALID', 'no vendor trust store is configured to check birth certificates');
              try {
                await this.#birthCheck(trx, d.birthCertificate!, spkiOf(i, d), now, d.birthCertificateChain ?? []);
              } catch (err) {
                if (err instanceof HallmarkError) throw new HallmarkError(err.code, `entry ${i + 1} (UDID ${udid}): ${err.message}`);
                throw err;
              }
              outcomes[i] = 'registered';
            }
          }

          // 2. The new devices, in UDID order.
          await this.#insertInUdidOrder(trx, batch, devices, outcomes, udidOf, keyHash, spkiOf);

          // 3. One audit entry per registered or re-registered device, in input order, then the summary:
          //    all in this transaction.
          const summaryEvent = summary?.(outcomes);
          const auditAt = new Date();
          let events: AuditEvent[] = [];
          for (let i = 0; i < n; i++) {
            const outcome = outcomes[i];
            if (outcome === 'registered') {
              const d = devices.at(i)!;
              events.push({ actor, action: source, target: udidOf(i), details: { batch: batchId, serialNumber: d.serialNumber ?? null, tenant: d.tenant ?? DEFAULT_TENANT, birthCertificate: !!d.birthCertificate } });
            } else if (outcome === 're-registered') {
              events.push({ actor, action: 'device.reregister', target: udidOf(i), details: { batch: batchId, previousBatch: previousBatch.get(i) } });
            }
            if (events.length >= AUDIT_CHUNK) { await appendAudit(trx, events, auditAt); events = []; }
          }
          if (summaryEvent) events.push(summaryEvent);
          await appendAudit(trx, events, auditAt);
          return outcomes;
        } finally {
          await restoreCache().catch(() => { /* the cache size is only memory; the transaction's outcome matters */ });
        }
      });
    } catch (err) {
      if (clone) await this.#auditRefusal(clone.event);
      if (isUniqueViolation(err)) throw new HallmarkError('CLONE_DETECTED', 'a UDID or public key was registered concurrently by another device; refused as a possible clone', { cause: err });
      throw err;
    }
  }

  /**
   * Inserts the devices whose outcome is "registered", sorted by UDID: three of the four device indexes
   * then grow at their end instead of at random pages. The sort key is the UDID's first 12 hex digits
   * as a number (right-padded with "0", which keeps the order), ties broken on the whole UDID.
   */
  async #insertInUdidOrder(trx: Transaction<Database>, batch: BatchRow, devices: DeviceRegistrationList, outcomes: readonly RegistrationOutcome[],
    udidOf: (i: number) => string, keyHash: (i: number) => string, spkiOf: (i: number, d: DeviceRegistration) => Buffer): Promise<void> {
    let count = 0;
    for (const o of outcomes) if (o === 'registered') count++;
    const order = new Uint32Array(count);
    const prefix = new Float64Array(outcomes.length);
    for (let i = 0, k = 0; i < outcomes.length; i++) {
      if (outcomes[i] !== 'registered') continue;
      order[k++] = i;
      const udid = udidOf(i);
      prefix[i] = parseInt(udid.length >= 12 ? udid.slice(0, 12) : udid.padEnd(12, '0'), 16);
    }
    order.sort((a, b) => prefix[a]! - prefix[b]! || (udidOf(a) < udidOf(b) ? -1 : 1));
    const insert = this.store.dialect === 'postgres' ? insertDevicesPostgres : insertDevicesSqlite;
    for (let k = 0; k < count; k += INSERT_ROWS) {
      const rows: DeviceInsert[] = [];
      for (const i of order.subarray(k, k + INSERT_ROWS)) {
        const d = devices.at(i)!;
        rows.push({ udid: udidOf(i), spki: spkiOf(i, d), keyHash: keyHash(i), serial: d.serialNumber ?? null, tenant: d.tenant ?? DEFAULT_TENANT, birth: d.birthCertificate ?? null });
      }
      await insert(trx, batch, rows, nowIso());
    }
  }

  /** The devices holding any of these UDIDs or key hashes (hex SHA-256 of the SPKI DER). */
  async #holders(trx: Transaction<Database>, udids: readonly string[], keyHashes: readonly string[]): Promise<Holder[]> {
    if (this.store.dialect === 'postgres') {
      const { rows } = await sql<Holder>`select udid, public_key_sha256, batch_id, state from devices where udid = any(${udids}::text[]) or public_key_sha256 = any(${keyHashes}::text[])`.execute(trx);
      return rows;
    }
    const { rows } = await trx.executeQuery<Holder>(CompiledQuery.raw(`select udid, public_key_sha256, batch_id, state from devices
      where udid in (select value from json_each(?)) or public_key_sha256 in (select value from json_each(?))`, [JSON.stringify(udids), JSON.stringify(keyHashes)]));
    return rows;
  }

  /**
   * SQLite: a bulk registration writes a million rows into four indexes at once; with the default 2 MB
   * page cache most of those writes miss it. A larger cache on this connection while it runs (memory,
   * not durability: synchronous=FULL and the single transaction are unchanged). Returns the restorer.
   */
  async #bulkPageCache(trx: Transaction<Database>, devices: number): Promise<() => Promise<void>> {
    if (this.store.dialect !== 'sqlite' || devices < BULK_DEVICES) return async () => {};
    const { rows } = await sql<{ cache_size: number }>`pragma cache_size`.execute(trx);
    const previous = Number(rows[0]?.cache_size ?? -2000);
    if (previous < 0 && -previous >= BULK_PAGE_CACHE_KIB) return async () => {};
    await sql.raw(`pragma cache_size = -${BULK_PAGE_CACHE_KIB}`).execute(trx);
    return async () => { await sql.raw(`pragma cache_size = ${Math.trunc(previous)}`).execute(trx); };
  }

  async registerDevice(batchId: string, device: DeviceRegistration, actor: string): Promise<DeviceInfo> {
    const d = prepareRegistration(device, 0);
    await this.registerDevices(batchId, [device], actor);
    return this.device(d.udid);
  }

  async deviceRow(udid: string): Promise<DeviceRow> {
    const row = await this.store.db.selectFrom('devices').selectAll().where('udid', '=', normaliseUdid(udid)).executeTakeFirst();
    if (!row) throw new HallmarkError('DEVICE_NOT_FOUND', `no device with UDID ${udid}`);
    return row;
  }

  async device(udid: string): Promise<DeviceInfo> {
    const rows = await this.#deviceQuery().where('devices.udid', '=', normaliseUdid(udid)).execute();
    if (!rows[0]) throw new HallmarkError('DEVICE_NOT_FOUND', `no device with UDID ${udid}`);
    return deviceInfo(rows[0]);
  }

  /** The device holding this hardware key (SPKI DER), if any: the lookup a registered-key enrolment makes. */
  async deviceByPublicKey(spki: Buffer): Promise<DeviceInfo | undefined> {
    const rows = await this.#deviceQuery().where('devices.public_key_sha256', '=', udidOfKey(canonicalSpki(spki))).execute();
    return rows[0] ? deviceInfo(rows[0]) : undefined;
  }

  /** Pages by UDID: pass the last UDID of a page as `after` to get the next. */
  async listDevices(options: { batch?: string; state?: DeviceState; tenant?: string; after?: string; limit?: number } = {}): Promise<{ items: DeviceInfo[]; next: string | null }> {
    const limit = Math.min(Math.max(options.limit ?? 100, 1), 1000);
    let q = this.#deviceQuery();
    if (options.batch) q = q.where('devices.batch_id', '=', options.batch);
    if (options.state) q = q.where('devices.state', '=', options.state);
    if (options.tenant) q = q.where('devices.tenant', '=', options.tenant);
    if (options.after) q = q.where('devices.udid', '>', normaliseUdid(options.after));
    const rows = await q.orderBy('devices.udid').limit(limit + 1).execute();
    const items = rows.slice(0, limit).map(deviceInfo);
    return { items, next: rows.length > limit ? items[items.length - 1]!.udid : null };
  }

  #deviceQuery() {
    return this.store.db.selectFrom('devices')
      .innerJoin('products', 'products.id', 'devices.product_id')
      .innerJoin('lines', 'lines.id', 'devices.line_id')
      .select(['devices.udid', 'devices.serial_number', 'devices.state', 'products.name as product', 'lines.name as line', 'devices.batch_id', 'devices.tenant',
        'devices.public_key_sha256', 'devices.birth_cert_der', 'devices.created_at', 'devices.updated_at', 'devices.provisioned_at']);
  }

  async transfer(udid: string, tenant: string, actor: string): Promise<DeviceInfo> {
    const u = normaliseUdid(udid);
    checkName('tenant', tenant);
    await this.store.writeTransaction(async (trx) => {
      const row = await trx.selectFrom('devices').select(['tenant', 'state']).where('udid', '=', u).executeTakeFirst();
      if (!row) throw new HallmarkError('DEVICE_NOT_FOUND', `no device with UDID ${udid}`);
      if (row.state === 'decommissioned') throw new HallmarkError('ILLEGAL_TRANSITION', 'a decommissioned device cannot change owner');
      if (row.tenant === tenant) throw new HallmarkError('ILLEGAL_TRANSITION', `the device already belongs to ${tenant}`);
      await this.#ensureTenant(trx, tenant);
      await trx.updateTable('devices').set({ tenant, updated_at: nowIso() }).where('udid', '=', u).execute();
      await appendAudit(trx, [{ actor, action: 'device.transfer', target: u, details: { from: row.tenant, to: tenant } }]);
    });
    return this.device(u);
  }

  /** suspend / resume / revoke / decommission. Decommissioning and revoking mark the device's certificates revoked. */
  async changeState(udid: string, action: DeviceAction, actor: string): Promise<DeviceInfo> {
    const u = normaliseUdid(udid);
    const rule = TRANSITIONS[action];
    await this.store.writeTransaction(async (trx) => {
      const row = await trx.selectFrom('devices').select(['state']).where('udid', '=', u).executeTakeFirst();
      if (!row) throw new HallmarkError('DEVICE_NOT_FOUND', `no device with UDID ${udid}`);
      if (!rule.from.includes(row.state)) throw new HallmarkError('ILLEGAL_TRANSITION', `cannot ${action} a device that is ${row.state} (allowed from: ${rule.from.join(', ')})`);
      await trx.updateTable('devices').set({ state: rule.to, updated_at: nowIso() }).where('udid', '=', u).execute();
      let revoked = 0;
      if (action === 'decommission' || action === 'revoke') {
        const r = await trx.updateTable('certificates').set({ status: 'revoked', revoked_at: nowIso(), revocation_reason: action === 'decommission' ? 'cessationOfOperation' : 'unspecified' })
          .where('device_udid', '=', u).where('status', '=', 'valid').executeTakeFirst();
        revoked = Number(r.numUpdatedRows);
      }
      await appendAudit(trx, [{ actor, action: `device.${action}`, target: u, details: { from: row.state, to: rule.to, certificatesRevoked: revoked } }]);
    });
    return this.device(u);
  }

  // ------------------------------------------------------------ issuance gate

  /**
   * Inside the issuance transaction: checks the device may receive a certificate and, for its first
   * identity, takes one unit of its batch quota (atomically: the UPDATE only succeeds below quota).
   * Returns what the caller must record. Throws QUOTA_EXCEEDED / DEVICE_NOT_ELIGIBLE.
   */
  static async reserveIssuance(trx: Transaction<Database>, device: DeviceRow, batch: BatchRow, dialect: Dialect = 'sqlite'): Promise<{ firstIdentity: boolean }> {
    // Hand-written SQL (src/store/raw-sql.ts): these run for every enrolment.
    const current = (await rawSql<{ state: DeviceState; batch_id: string }>(trx, dialect, 'select state, batch_id from devices where udid = ?', [device.udid])).rows[0];
    if (!current || current.batch_id !== batch.id) throw new HallmarkError('DEVICE_NOT_ELIGIBLE', 'the device changed while its certificate was being made; try again');
    if (!['registered', 'provisioned', 'active'].includes(current.state)) throw new HallmarkError('DEVICE_NOT_ELIGIBLE', `the device is ${current.state}`);
    if (current.state !== 'registered') return { firstIdentity: false };
    const r = await rawSql(trx, dialect, 'update batches set issued_count = issued_count + 1 where id = ? and issued_count < ?', [batch.id, batch.quota]);
    if (r.changed !== 1) throw new HallmarkError('QUOTA_EXCEEDED', `batch ${batch.id} has used its quota of ${batch.quota} operational identities`);
    const now = nowIso();
    await rawSql(trx, dialect, "update devices set state = 'provisioned', provisioned_at = ?, updated_at = ? where udid = ?", [now, now, device.udid]);
    return { firstIdentity: true };
  }

  /**
   * Inside the issuance transaction: registers a device whose key was first seen at enrolment (a claim on a
   * batch that accepts unregistered keys). The UDID is the key's SHA-256. A key or UDID held by another
   * device is a clone. Returns the audit entry for the caller to append with the issuance's.
   */
  static async registerOnFirstUse(trx: Transaction<Database>, device: DeviceRow, actor: string, dialect: Dialect = 'sqlite'): Promise<AuditEvent> {
    const holder = (await rawSql<{ udid: string; batch_id: string }>(trx, dialect, 'select udid, batch_id from devices where udid = ? or public_key_sha256 = ?', [device.udid, device.public_key_sha256])).rows[0];
    if (holder) throw new HallmarkError('CLONE_DETECTED', `the key is already registered to device ${holder.udid} (batch ${holder.batch_id})`);
    if ((await rawSql(trx, dialect, 'select name from tenants where name = ?', [device.tenant])).rows.length === 0) await trx.insertInto('tenants').values({ name: device.tenant, created_at: nowIso() }).execute();
    await rawSql(trx, dialect, 'insert into devices (udid, public_key_spki, public_key_sha256, serial_number, product_id, line_id, batch_id, tenant, birth_cert_der, state, created_at, updated_at, provisioned_at) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)', [
      device.udid, device.public_key_spki, device.public_key_sha256, device.serial_number, device.product_id, device.line_id, device.batch_id, device.tenant, device.birth_cert_der, device.state, device.created_at, device.updated_at, device.provisioned_at,
    ]);
    return { actor, action: 'device.register', target: device.udid, details: { batch: device.batch_id, tenant: device.tenant, source: 'enrolment' } };
  }

  /** Audits a refused issuance and counts it on the batch and the line, so operators see which line tried. */
  async recordRefusedIssuance(device: DeviceRow, reason: HallmarkError, actor: string): Promise<void> {
    await this.#auditRefusal(
      { actor, action: reason.code === 'QUOTA_EXCEEDED' ? 'issuance.quota_exceeded' : 'issuance.refused', target: device.udid, details: { batch: device.batch_id, code: reason.code, reason: reason.message } },
      async (trx) => {
        if (reason.code !== 'QUOTA_EXCEEDED') return;
        await trx.updateTable('batches').set((eb) => ({ refused_count: eb('refused_count', '+', 1) })).where('id', '=', device.batch_id).execute();
        await trx.updateTable('lines').set((eb) => ({ refused_issuances: eb('refused_issuances', '+', 1) })).where('id', '=', device.line_id).execute();
      },
    );
  }
}

function deviceInfo(r: { udid: string; serial_number: string | null; state: DeviceState; product: string; line: string; batch_id: string; tenant: string; public_key_sha256: string; birth_cert_der: Buffer | null; created_at: string; updated_at: string; provisioned_at: string | null }): DeviceInfo {
  return {
    udid: r.udid, serialNumber: r.serial_number, state: r.state, product: r.product, line: r.line, batch: r.batch_id, tenant: r.tenant,
    publicKeySha256: r.public_key_sha256, hasBirthCertificate: r.birth_cert_der !== null, createdAt: r.created_at, updatedAt: r.updated_at, provisionedAt: r.provisioned_at,
  };
}

/**
 * Keys seen so far (UDIDs, key digests), each the number of the entry that brought it, for finding
 * duplicates among a million entries: the key bytes packed in one buffer and an open-addressing table of
 * entry numbers. A Map of strings costs about twice the memory, and its million strings are objects the
 * garbage collector copies and marks again and again during an import.
 */
export class KeyIndex {
  readonly #encoding: 'latin1' | 'hex';
  #bytes = Buffer.allocUnsafeSlow(64 * 1024);
  /** Entry e's key is #bytes[#starts[e], #starts[e + 1]). */
  #starts: Int32Array;
  #slots: Int32Array;
  #mask: number;
  #size = 0;

  /**
   * `encoding`: how string keys become bytes — "latin1" (one byte a character: a binary digest) or "hex"
   * (lowercase hex, e.g. a UDID or a SHA-256 in hex, kept at half the size). `expected`: how many keys
   * are coming, when known (the table is then never rebuilt).
   */
  constructor(encoding: 'latin1' | 'hex' = 'latin1', expected = 512) {
    this.#encoding = encoding;
    this.#starts = new Int32Array(Math.max(1024, expected) + 1);
    let slots = 1024;
    while (slots < expected * 2) slots *= 2;
    this.#slots = new Int32Array(slots);
    this.#mask = slots - 1;
  }

  get size(): number { return this.#size; }

  /** Adds `key` as entry `size` and returns -1, or returns the entry that already holds the same bytes, adding nothing. */
  add(key: string | Buffer): number {
    const start = this.#starts[this.#size]!;
    const hex = typeof key === 'string' && this.#encoding === 'hex';
    const length = hex ? key.length >> 1 : key.length;
    if (start + length > this.#bytes.length) {
      const grown = Buffer.allocUnsafeSlow(Math.max(this.#bytes.length * 2, start + length));
      this.#bytes.copy(grown, 0, 0, start);
      this.#bytes = grown;
    }
    const bytes = this.#bytes;
    if (typeof key !== 'string') key.copy(bytes, start);
    else if (bytes.write(key, start, length, this.#encoding) !== length || (hex && (key.length & 1) === 1)) throw new Error(`KeyIndex: not ${this.#encoding}: ${JSON.stringify(key.slice(0, 80))}`);
    const end = start + length;
    let slot = hashBytes(bytes, start, end) & this.#mask;
    for (let e = this.#slots[slot]!; e !== 0; e = this.#slots[slot]!) {
      const s = this.#starts[e - 1]!;
      if (this.#starts[e]! - s === length && bytes.compare(bytes, start, end, s, s + length) === 0) return e - 1;
      slot = (slot + 1) & this.#mask;
    }
    this.#slots[slot] = ++this.#size;
    if (this.#size + 1 >= this.#starts.length) {
      const grown = new Int32Array(this.#starts.length * 2);
      grown.set(this.#starts);
      this.#starts = grown;
    }
    this.#starts[this.#size] = end;
    if (this.#size * 2 > this.#slots.length) this.#rehash();
    return -1;
  }

  /** Takes back the entry added last (its slot can be emptied: no later key probed past it). */
  removeLast(): void {
    if (this.#size === 0) return;
    const e = this.#size;
    const s = this.#starts[e - 1]!;
    let slot = hashBytes(this.#bytes, s, this.#starts[e]!) & this.#mask;
    while (this.#slots[slot] !== e) slot = (slot + 1) & this.#mask;
    this.#slots[slot] = 0;
    this.#size--;
  }

  /** Forgets every key (and gives back their memory). */
  clear(): void {
    this.#bytes = Buffer.allocUnsafeSlow(1024);
    this.#starts = new Int32Array(1025);
    this.#slots = new Int32Array(1024);
    this.#mask = 1023;
    this.#size = 0;
  }

  /** Entry e's key as a string (in the index's encoding). */
  string(e: number): string {
    return this.#bytes.toString(this.#encoding, this.#starts[e]!, this.#starts[e + 1]!);
  }

  #rehash(): void {
    const slots = new Int32Array(this.#slots.length * 2);
    const mask = slots.length - 1;
    for (let e = 1; e <= this.#size; e++) {
      let slot = hashBytes(this.#bytes, this.#starts[e - 1]!, this.#starts[e]!) & mask;
      while (slots[slot] !== 0) slot = (slot + 1) & mask;
      slots[slot] = e;
    }
    this.#slots = slots;
    this.#mask = mask;
  }
}

/** FNV-1a over bytes[start, end), mixed at the end so that the low bits (the slot) depend on every byte. */
function hashBytes(bytes: Buffer, start: number, end: number): number {
  let h = 0x811c9dc5;
  for (let i = start; i < end; i++) h = Math.imul(h ^ bytes[i]!, 0x01000193);
  h ^= h >>> 15;
  h = Math.imul(h, 0x2c1b3c6d);
  return (h ^ (h >>> 12)) >>> 0;
}

/** The columns of an existing device that decide what happens to a registration of the same UDID or key. */
interface Holder { udid: string; public_key_sha256: string; batch_id: string; state: DeviceState }

/** A new device row, less what the batch and the time give. */
interface DeviceInsert { udid: string; spki: Buffer; keyHash: string; serial: string | null; tenant: string; birth: Buffer | null }

/** Devices per holder lookup. */
const LOOKUP_CHUNK = 2000;
/** Rows per insert statement (their columns travel as JSON on SQLite, as arrays on PostgreSQL). */
const INSERT_ROWS = 1000;
/** Audit entries appended at a time (the chain is continued from one append to the next). */
const AUDIT_CHUNK = 5000;
/** From this many devices in one call, SQLite gets BULK_PAGE_CACHE_KIB of page cache for it. */
const BULK_DEVICES = 20_000;
const BULK_PAGE_CACHE_KIB = 64 * 1024;

const DEVICE_COLUMNS = '(udid, public_key_spki, public_key_sha256, serial_number, product_id, line_id, batch_id, tenant, birth_cert_der, state, created_at, updated_at, provisioned_at)';

/**
 * SQLite: one INSERT … SELECT FROM json_each(?) per call. The rows travel as one JSON parameter (keys
 * and certificates in hex), so the statement is short whatever the row count: Kysely would build and
 * compile thirteen values a row, and SQLite parse and plan a statement of 13,000 parameters each time.
 */
async function insertDevicesSqlite(trx: Transaction<Database>, batch: BatchRow, rows: readonly DeviceInsert[], at: string): Promise<void> {
  const json = JSON.stringify(rows.map((r) => [r.udid, r.spki.toString('hex'), r.keyHash, r.serial, r.tenant, r.birth ? r.birth.toString('hex') : null]));
  await trx.executeQuery(CompiledQuery.raw(`insert into devices ${DEVICE_COLUMNS}
    select value ->> 0, unhex(value ->> 1), value ->> 2, value ->> 3, ?, ?, ?, value ->> 4, unhex(value ->> 5), 'registered', ?, ?, null from json_each(?)`,
  [batch.product_id, batch.line_id, batch.id, at, at, json]));
}

/** PostgreSQL: one INSERT … SELECT FROM unnest(arrays) per call: eleven parameters whatever the row count. */
async function insertDevicesPostgres(trx: Transaction<Database>, batch: BatchRow, rows: readonly DeviceInsert[], at: string): Promise<void> {
  await sql`insert into devices ${sql.raw(DEVICE_COLUMNS)}
    select u, k, h, s, ${batch.product_id}::integer, ${batch.line_id}::integer, ${batch.id}::text, t, b, 'registered', ${at}::text, ${at}::text, null
    from unnest(${rows.map((r) => r.udid)}::text[], ${rows.map((r) => r.spki)}::bytea[], ${rows.map((r) => r.keyHash)}::text[],
                ${rows.map((r) => r.serial)}::text[], ${rows.map((r) => r.tenant)}::text[], ${rows.map((r) => r.birth)}::bytea[]) as x(u, k, h, s, t, b)`.execute(trx);
}

interface PreparedRegistration {
  readonly udid: string;
  readonly keyHash: string;
  readonly publicKeySpki: Buffer;
  readonly serialNumber: string | null;
  readonly birthCertificate?: Buffer;
  readonly birthCertificateChain: readonly Buffer[];
  readonly tenant: string;
}

function prepareRegistration(d: DeviceRegistration, index: number): PreparedRegistration {
  const where = `entry ${index + 1}`;
  const spki = canonicalSpkiAt(d.publicKeySpki, where);
  const keyHash = udidOfKey(spki);
  const udid = d.udid ? normaliseUdid(d.udid) : keyHash;
  // It goes into the certificate subject as an X.520 serialNumber (a PrintableString).
  if (d.serialNumber !== undefined && !/^[A-Za-z0-9 '()+,\-./:=?]{1,64}$/.test(d.serialNumber)) throw new HallmarkError('BAD_REQUEST', `${where}: the serial number must be 1-64 characters of A-Z a-z 0-9 space ' ( ) + , - . / : = ?`);
  return { udid, keyHash, publicKeySpki: spki, serialNumber: d.serialNumber ?? null, birthCertificate: d.birthCertificate, birthCertificateChain: d.birthCertificateChain ?? [], tenant: d.tenant ?? DEFAULT_TENANT };
}

/**
 * The SPKI DER as Node re-encodes it, so one key has one hash whatever encoding it arrived in. A P-256
 * key already in canonical form (named curve, uncompressed point) is only checked to be on the curve:
 * importing it through OpenSSL costs ~70 µs, more than the rest of a registration (bulk imports).
 */
function canonicalSpkiAt(spki: Buffer, where: string): Buffer {
  if (isP256Spki(spki)) {
    if (!isP256Point(spki.subarray(27, 59), spki.subarray(59, 91))) throw new HallmarkError('UNSUPPORTED_ALGORITHM', `${where}: the P-256 public key is not a point on the curve`);
    return spki;
  }
  let key;
  try {
    key = publicKeyFromSpki(spki);
  } catch (err) {
    throw new HallmarkError('UNSUPPORTED_ALGORITHM', `${where}: the public key cannot be read (${(err as Error).message})`);
  }
  if (!['ec', 'ed25519', 'rsa'].includes(key.asymmetricKeyType ?? '')) throw new HallmarkError('UNSUPPORTED_ALGORITHM', `${where}: unsupported key type ${key.asymmetricKeyType}`);
  return key.export({ type: 'spki', format: 'der' });
}

const canonicalSpki = (spki: Buffer): Buffer => canonicalSpkiAt(spki, 'public key');

function isUniqueViolation(err: unknown): boolean {
  const e = err as { code?: string; message?: string };
  return e?.code === '23505' || /UNIQUE constraint failed/.test(e?.message ?? '');
}
