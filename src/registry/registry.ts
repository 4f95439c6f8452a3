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
import { deviceLookups } from './device-lookups.js';

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
   * Two entries of the list with the same UDID or key refuse the call too. Entries are named by their
   * number in the list ("entry 3"). Returns each entry's outcome, in list order.
   */
  async registerDevices(batchId: string, devices: DeviceRegistrationList, actor: string, source = 'device.register', summary?: (counts: RegistrationCounts) => AuditEvent | undefined): Promise<RegistrationOutcome[]> {
    const n = devices.length;
    // Every entry is checked (key, UDID, serial) before any is compared: a malformed entry anywhere is
    // reported first, before a duplicate or a clone, and before the transaction starts.
    for (let i = 0; i < n; i++) prepareRegistration(devices.at(i)!, `entry ${i + 1}`);
    const outcomes = new Array<RegistrationOutcome>(n);
    const birthCheck = this.#birthCheck;
    await this.registerDeviceStream(batchId, async function* () {
      for (let start = 0; start < n; start += STAGE_ROWS) {
        const chunk: StagedRegistration[] = [];
        for (let i = start; i < Math.min(n, start + STAGE_ROWS); i++) chunk.push({ position: i + 1, registration: devices.at(i)! });
        yield chunk;
      }
    }, {
      actor, source, summary, expected: n,
      where: (position, udid) => `entry ${position}${udid ? ` (UDID ${udid})` : ''}`,
      onOutcome: (position, outcome) => { outcomes[position - 1] = outcome; },
      checkBirth: async (trx, position, spki, at) => {
        const d = devices.at(position - 1)!;
        if (!birthCheck) throw new HallmarkError('BIRTH_CERT_INVALID', 'no vendor trust store is configured to check birth certificates');
        await birthCheck(trx, d.birthCertificate!, spki, at, d.birthCertificateChain ?? []);
      },
    });
    return outcomes;
  }

  /**
   * Registers a stream of devices into one batch in one write transaction: all or none, with the
   * guarantees of registerDevices. Built for imports of millions of devices in flat memory: `entries`
   * is called with the open transaction (the caller may verify entries in it as they are read) and
   * yields them in chunks; each chunk is checked and staged in a temporary table of this transaction
   * (in the temp database file on SQLite, a temp table on PostgreSQL), not kept in memory. Then:
   *
   *   1. duplicates inside the input: the later entry refuses the call (or is skipped: onDuplicate);
   *   2. in input order, each entry against the devices already stored: unchanged, re-registered
   *      (decommissioned before), a clone (refuses the call, audited after the rollback), or new; birth
   *      certificates of new and re-registered devices are checked (checkBirth) and each is audited;
   *   3. the new devices are inserted by one INSERT … SELECT … ORDER BY udid: three of the four device
   *      indexes then grow at their end. Inserting them chunk by chunk, at random places in indexes larger
   *      than the page cache, was measured 4.4 times slower on SQLite (106 s instead of 24 s for 1M).
   *
   * Memory holds one chunk and the entries involved in duplicates, whatever the input's size.
   */
  async registerDeviceStream(batchId: string, entries: (trx: Transaction<Database>) => AsyncIterable<readonly StagedRegistration[]>, options: RegistrationStreamOptions): Promise<RegistrationCounts> {
    const { actor, source } = options;
    const pg = this.store.dialect === 'postgres';
    const staging = pg ? 'pg_temp.hallmark_registration' : 'temp.hallmark_registration';
    let clone: { event: AuditEvent; message: string } | undefined;
    try {
      return await this.store.writeTransaction(async (trx) => {
        const batch = await trx.selectFrom('batches').selectAll().where('id', '=', batchId).executeTakeFirst();
        if (!batch) throw new HallmarkError('BATCH_NOT_FOUND', `no batch ${JSON.stringify(batchId)}`);
        if (batch.expires_at && new Date(batch.expires_at) <= new Date()) throw new HallmarkError('BATCH_EXPIRED', `batch ${batchId} expired at ${batch.expires_at}`);
        const restoreCache = await this.#bulkPageCache(trx, options.expected ?? BULK_DEVICES);
        try {
          await sql.raw(`drop table if exists ${staging}`).execute(trx);
          await sql.raw(`create temp table hallmark_registration (pos integer primary key, position integer not null, udid text not null, spki ${pg ? 'bytea' : 'blob'} not null,
            key_hash text not null, serial text, tenant text not null, birth ${pg ? 'bytea' : 'blob'}, outcome integer not null default 0)${pg ? ' on commit drop' : ''}`).execute(trx);

          // 0. Stage the input, chunk by chunk, each entry checked as it comes.
          const tenants = new Set<string>();
          let staged = 0;
          for await (const chunk of entries(trx)) {
            const rows: StagingRow[] = [];
            for (const { position, registration } of chunk) {
              const d = prepareRegistration(registration, options.where(position, registration.udid));
              if (!tenants.has(d.tenant)) { await this.#ensureTenant(trx, d.tenant); tenants.add(d.tenant); }
              rows.push({ pos: staged++, position, udid: d.udid, spki: d.publicKeySpki, keyHash: d.keyHash, serial: d.serialNumber, tenant: d.tenant, birth: d.birthCertificate ?? null });
            }
            for (let k = 0; k < rows.length; k += INSERT_ROWS) await stageRows(trx, pg, staging, rows.slice(k, k + INSERT_ROWS));
          }
          // PostgreSQL plans the queries below from statistics, which a temporary table only has once analysed
          // (without them a range of staged entries can be estimated at thousands of rows and joined by hashing
          // the whole devices table).
          if (pg && staged >= BULK_DEVICES) await sql.raw(`analyze ${staging}`).execute(trx);

          // 1. Duplicates inside the input: only the entries sharing a UDID or key with another are read
          //    back, and decided in input order (an entry is compared with the entries kept before it).
          const { rows: involved } = await sql<{ pos: number; position: number; udid: string; key_hash: string }>`select pos, position, udid, key_hash from ${sql.raw(staging)}
            where udid in (select udid from ${sql.raw(staging)} group by udid having count(*) > 1)
               or key_hash in (select key_hash from ${sql.raw(staging)} group by key_hash having count(*) > 1)
            order by pos`.execute(trx);
          const keptUdid = new Map<string, number>();
          const keptKey = new Map<string, number>();
          const dropped: number[] = [];
          for (const r of involved) {
            const earlier = keptUdid.get(r.udid) ?? keptKey.get(r.key_hash);
            if (earlier === undefined) { keptUdid.set(r.udid, Number(r.position)); keptKey.set(r.key_hash, Number(r.position)); continue; }
            const duplicate = { position: Number(r.position), udid: r.udid, earlier, what: keptUdid.has(r.udid) ? 'UDID' as const : 'public key' as const };
            if (!options.onDuplicate) throw new HallmarkError('CLONE_DETECTED', `${options.where(duplicate.position, r.udid)}: the same ${duplicate.what} as entry ${earlier} of this input`);
            options.onDuplicate(duplicate);
            dropped.push(Number(r.pos));
          }
          for (let k = 0; k < dropped.length; k += INSERT_ROWS) await deleteStaged(trx, pg, staging, dropped.slice(k, k + INSERT_ROWS));

          // 2. Each entry, in input order, against the devices already stored.
          const now = new Date();
          const auditAt = new Date();
          const counts = { registered: 0, unchanged: 0, reRegistered: 0 };
          let events: AuditEvent[] = [];
          for (let start = 0; start < staged; start += LOOKUP_CHUNK) {
            const { rows } = await sql<ClassifyRow>`select s.pos, s.position, s.udid, s.key_hash, s.serial, s.tenant, (s.birth is not null) as has_birth,
                u.public_key_sha256 as u_key, u.batch_id as u_batch, u.state as u_state, k.udid as k_udid, k.batch_id as k_batch, k.state as k_state
              from ${sql.raw(staging)} s left join devices u on u.udid = s.udid left join devices k on k.public_key_sha256 = s.key_hash
              where s.pos >= ${start} and s.pos < ${start + LOOKUP_CHUNK} order by s.pos`.execute(trx);
            const notNew: number[] = [];
            for (const r of rows) {
              const position = Number(r.position);
              const hasBirth = r.has_birth === true || Number(r.has_birth) === 1;
              const byUdid: Holder | undefined = r.u_key !== null ? { udid: r.udid, public_key_sha256: r.u_key, batch_id: r.u_batch!, state: r.u_state! } : undefined;
              const byKey: Holder | undefined = r.k_udid !== null ? { udid: r.k_udid, public_key_sha256: r.key_hash, batch_id: r.k_batch!, state: r.k_state! } : undefined;
              const holder = byUdid ?? byKey;
              const checkBirth = async (): Promise<void> => {
                if (!hasBirth || !options.checkBirth) return;
                try {
                  const { rows: [spki] } = await sql<{ spki: Buffer }>`select spki from ${sql.raw(staging)} where pos = ${r.pos}`.execute(trx);
                  await options.checkBirth(trx, position, Buffer.from(spki!.spki), now);
                } catch (err) {
                  if (err instanceof HallmarkError) throw new HallmarkError(err.code, `${options.where(position, r.udid)}: ${err.message}`);
                  throw err;
                }
              };
              if (!holder) {
                await checkBirth();
                counts.registered++;
                options.onOutcome?.(position, 'registered');
                events.push({ actor, action: source, target: r.udid, details: { batch: batchId, serialNumber: r.serial, tenant: r.tenant, birthCertificate: hasBirth } });
              } else {
                const same = holder.udid === r.udid && holder.public_key_sha256 === r.key_hash;
                notNew.push(Number(r.pos));
                if (same && holder.batch_id === batchId && holder.state !== 'decommissioned') {
                  counts.unchanged++;
                  options.onOutcome?.(position, 'unchanged');
                } else if (same && holder.state === 'decommissioned') {
                  // Registered anew after end of life: back to "registered", in this batch.
                  await checkBirth();
                  const { rows: [row] } = hasBirth ? await sql<{ birth: Buffer }>`select birth from ${sql.raw(staging)} where pos = ${r.pos}`.execute(trx) : { rows: [] };
                  await trx.updateTable('devices').set({
                    state: 'registered', batch_id: batchId, product_id: batch.product_id, line_id: batch.line_id, tenant: r.tenant, serial_number: r.serial,
                    // Without a new birth certificate, the one on record stays.
                    ...(row ? { birth_cert_der: Buffer.from(row.birth) } : {}), updated_at: nowIso(), provisioned_at: null,
                  }).where('udid', '=', r.udid).execute();
                  counts.reRegistered++;
                  options.onOutcome?.(position, 're-registered');
                  events.push({ actor, action: 'device.reregister', target: r.udid, details: { batch: batchId, previousBatch: holder.batch_id } });
                } else {
                  const what = byUdid && byUdid.public_key_sha256 !== r.key_hash ? 'UDID is registered with a different key' : byKey && byKey.udid !== r.udid ? 'public key is registered under another UDID' : 'device is registered in another batch';
                  clone = {
                    message: `${options.where(position, r.udid)}: ${what} (batch ${holder.batch_id}); refused as a possible clone`,
                    event: { actor, action: 'device.clone_refused', target: r.udid, details: { batch: batchId, existingBatch: holder.batch_id, existingUdid: holder.udid, reason: what, source } },
                  };
                  throw new HallmarkError('CLONE_DETECTED', clone.message);
                }
              }
              if (events.length >= AUDIT_CHUNK) { await appendAudit(trx, events, auditAt); events = []; }
            }
            for (let k = 0; k < notNew.length; k += INSERT_ROWS) await markStaged(trx, pg, staging, notNew.slice(k, k + INSERT_ROWS));
          }

          // 3. The new devices, in UDID order, in one statement; then the summary entry.
          await sql`insert into devices ${sql.raw(DEVICE_COLUMNS)}
            select udid, spki, key_hash, serial, cast(${batch.product_id} as integer), cast(${batch.line_id} as integer), cast(${batch.id} as text), tenant, birth, 'registered',
              cast(${nowIso()} as text), cast(${nowIso()} as text), null
            from ${sql.raw(staging)} where outcome = 0 order by udid`.execute(trx);
          const summaryEvent = options.summary?.(counts);
          if (summaryEvent) events.push(summaryEvent);
          await appendAudit(trx, events, auditAt);
          if (!pg) await sql.raw(`drop table ${staging}`).execute(trx);
          return counts;
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
    const d = prepareRegistration(device, 'the device');
    await this.registerDevices(batchId, [device], actor);
    return this.device(d.udid);
  }

  async deviceRow(udid: string): Promise<DeviceRow> {
    const row = await this.store.db.selectFrom('devices').selectAll().where('udid', '=', normaliseUdid(udid)).executeTakeFirst();
    if (!row) throw new HallmarkError('DEVICE_NOT_FOUND', `no device with UDID ${udid}`);
    return row;
  }

  /** The device with this UDID (what an issuance or a connection check reads). On PostgreSQL, concurrent lookups share one query (device-lookups.ts). */
  async device(udid: string): Promise<DeviceInfo> {
    const u = normaliseUdid(udid);
    const row = this.store.dialect === 'postgres'
      ? await deviceLookups(this.store).byUdid.get(u)
      : (await this.#deviceQuery().where('devices.udid', '=', u).execute())[0];
    if (!row) throw new HallmarkError('DEVICE_NOT_FOUND', `no device with UDID ${udid}`);
    return deviceInfo(row);
  }

  /** The device holding this hardware key (SPKI DER), if any: the lookup a registered-key enrolment makes. */
  async deviceByPublicKey(spki: Buffer): Promise<DeviceInfo | undefined> {
    const hash = udidOfKey(canonicalSpki(spki));
    const row = this.store.dialect === 'postgres'
      ? await deviceLookups(this.store).byKeyHash.get(hash)
      : (await this.#deviceQuery().where('devices.public_key_sha256', '=', hash).execute())[0];
    return row ? deviceInfo(row) : undefined;
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

/** The columns of an existing device that decide what happens to a registration of the same UDID or key. */
interface Holder { udid: string; public_key_sha256: string; batch_id: string; state: DeviceState }

/** One entry of a registration stream, and its number as the caller names it in messages. */
export interface StagedRegistration { readonly position: number; readonly registration: DeviceRegistration }

export interface RegistrationCounts { readonly registered: number; readonly unchanged: number; readonly reRegistered: number }

export interface RegistrationStreamOptions {
  readonly actor: string;
  /** The audit action of each new device (e.g. "device.register", "manifest.import"). */
  readonly source: string;
  /** How the caller names an entry in messages: "entry 3 (UDID …)", "line 12 (udid …)". */
  readonly where: (position: number, udid?: string) => string;
  /** How many entries are coming, when known (SQLite: a bulk registration gets a larger page cache). */
  readonly expected?: number;
  /**
   * An entry with the UDID or key of an earlier kept entry of the input. Without this callback it refuses
   * the call (CLONE_DETECTED); the callback may throw its own error, or return to skip the entry.
   */
  readonly onDuplicate?: (duplicate: { position: number; udid: string; earlier: number; what: 'UDID' | 'public key' }) => void;
  /**
   * Checks the birth certificate of an entry that is about to be registered or re-registered (not one
   * that is unchanged). Without it, birth certificates are stored as given: the caller verified them.
   */
  readonly checkBirth?: (trx: Transaction<Database>, position: number, publicKeySpki: Buffer, at: Date) => Promise<void>;
  readonly onOutcome?: (position: number, outcome: RegistrationOutcome) => void;
  /** The summary audit entry, committed with the devices (none: undefined). */
  readonly summary?: (counts: RegistrationCounts) => AuditEvent | undefined;
}

/** Entries per staged chunk of registerDevices. */
const STAGE_ROWS = 2000;
/** Staged entries compared with the stored devices at a time. */
const LOOKUP_CHUNK = 2000;
/** Rows per staging statement (their columns travel as JSON on SQLite, as arrays on PostgreSQL). */
const INSERT_ROWS = 1000;
/** Audit entries appended at a time (the chain is continued from one append to the next). */
const AUDIT_CHUNK = 5000;
/** From this many devices in one call, SQLite gets BULK_PAGE_CACHE_KIB of page cache for it. */
const BULK_DEVICES = 20_000;
const BULK_PAGE_CACHE_KIB = 64 * 1024;

const DEVICE_COLUMNS = '(udid, public_key_spki, public_key_sha256, serial_number, product_id, line_id, batch_id, tenant, birth_cert_der, state, created_at, updated_at, provisioned_at)';

/** A row of the staging table: one checked entry of the input. */
interface StagingRow { pos: number; position: number; udid: string; spki: Buffer; keyHash: string; serial: string | null; tenant: string; birth: Buffer | null }

/** A staged entry with the devices holding its UDID (u_) and its key (k_), if any. */
interface ClassifyRow {
  pos: number; position: number; udid: string; key_hash: string; serial: string | null; tenant: string; has_birth: number | boolean;
  u_key: string | null; u_batch: string | null; u_state: DeviceState | null; k_udid: string | null; k_batch: string | null; k_state: DeviceState | null;
}

/**
 * Appends rows to the staging table. SQLite: one INSERT … SELECT FROM json_each(?) (keys and certificates
 * in hex), so the statement is short whatever the row count; PostgreSQL: one INSERT … SELECT FROM unnest(arrays).
 */
async function stageRows(trx: Transaction<Database>, pg: boolean, staging: string, rows: readonly StagingRow[]): Promise<void> {
  if (rows.length === 0) return;
  if (pg) {
    await sql`insert into ${sql.raw(staging)} (pos, position, udid, spki, key_hash, serial, tenant, birth)
      select * from unnest(${rows.map((r) => r.pos)}::integer[], ${rows.map((r) => r.position)}::integer[], ${rows.map((r) => r.udid)}::text[], ${rows.map((r) => r.spki)}::bytea[],
        ${rows.map((r) => r.keyHash)}::text[], ${rows.map((r) => r.serial)}::text[], ${rows.map((r) => r.tenant)}::text[], ${rows.map((r) => r.birth)}::bytea[])`.execute(trx);
    return;
  }
  const json = JSON.stringify(rows.map((r) => [r.pos, r.position, r.udid, r.spki.toString('hex'), r.keyHash, r.serial, r.tenant, r.birth ? r.birth.toString('hex') : null]));
  await trx.executeQuery(CompiledQuery.raw(`insert into ${staging} (pos, position, udid, spki, key_hash, serial, tenant, birth)
    select value ->> 0, value ->> 1, value ->> 2, unhex(value ->> 3), value ->> 4, value ->> 5, value ->> 6, unhex(value ->> 7) from json_each(?)`, [json]));
}

/** Removes staged entries (skipped duplicates). */
async function deleteStaged(trx: Transaction<Database>, pg: boolean, staging: string, positions: readonly number[]): Promise<void> {
  if (pg) await sql`delete from ${sql.raw(staging)} where pos = any(${positions}::integer[])`.execute(trx);
  else await trx.executeQuery(CompiledQuery.raw(`delete from ${staging} where pos in (select value from json_each(?))`, [JSON.stringify(positions)]));
}

/** Marks staged entries that are not new devices (unchanged, re-registered): the final INSERT leaves them out. */
async function markStaged(trx: Transaction<Database>, pg: boolean, staging: string, positions: readonly number[]): Promise<void> {
  if (pg) await sql`update ${sql.raw(staging)} set outcome = 1 where pos = any(${positions}::integer[])`.execute(trx);
  else await trx.executeQuery(CompiledQuery.raw(`update ${staging} set outcome = 1 where pos in (select value from json_each(?))`, [JSON.stringify(positions)]));
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

/** Checks a registration (key, UDID, serial); `where` names it in errors. */
function prepareRegistration(d: DeviceRegistration, where: string): PreparedRegistration {
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
