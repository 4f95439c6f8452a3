// Claims: batch-scoped, expiring, use-counted enrolment credentials ("hallmark claim create"). A
// claim is presented as HTTP Basic credentials (username = claim id, password = secret) and lets up
// to max_uses devices of its batch enrol once each before it expires. Only SHA-256(secret) is stored;
// the secret is shown once. Creation, revocation, every use and every failed presentation are audited.

import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import type { Transaction } from 'kysely';
import { appendAudit, type AuditEvent } from '../audit/audit-log.js';
import { HallmarkError } from '../errors.js';
import { nowIso, type Dialect, type Store } from '../store/database.js';
import { defineProcedure } from '../store/procedures.js';
import { rawSql } from '../store/raw-sql.js';
import type { ClaimRow, Database } from '../store/schema.js';

export interface CreatedClaim {
  readonly id: string;
  readonly secret: string;
  readonly batch: string;
  readonly maxUses: number;
  readonly perMinute: number;
  readonly expiresAt: string;
  /** "id:secret", what a device presents as HTTP Basic credentials. */
  readonly basic: string;
}

export interface ClaimInfo {
  readonly id: string;
  readonly batch: string;
  readonly maxUses: number;
  readonly used: number;
  readonly perMinute: number;
  readonly expiresAt: string;
  readonly revokedAt: string | null;
  readonly createdBy: string;
  readonly createdAt: string;
  readonly lastUsedAt: string | null;
  readonly status: 'active' | 'expired' | 'revoked' | 'used-up';
}

/** Default request rate a claim accepts (sustained, per minute); a factory line enrols far below it. */
export const DEFAULT_CLAIM_PER_MINUTE = 600;
const MAX_CLAIM_USES = 10_000_000;
const MAX_CLAIM_TTL_MS = 366 * 86400e3;

const hashSecret = (secret: string): string => createHash('sha256').update(secret).digest('hex');

export async function createClaim(store: Store, options: { batch: string; uses: number; ttlMs: number; perMinute?: number; actor: string }): Promise<CreatedClaim> {
  if (!Number.isInteger(options.uses) || options.uses < 1 || options.uses > MAX_CLAIM_USES) throw new HallmarkError('BAD_REQUEST', `--uses must be 1..${MAX_CLAIM_USES}`);
  if (!(options.ttlMs > 0) || options.ttlMs > MAX_CLAIM_TTL_MS) throw new HallmarkError('BAD_DURATION', 'a claim lives at most 366 days');
  const perMinute = options.perMinute ?? DEFAULT_CLAIM_PER_MINUTE;
  if (!Number.isInteger(perMinute) || perMinute < 1 || perMinute > 10_000_000) throw new HallmarkError('BAD_REQUEST', '--per-minute must be 1..10000000');
  const id = `cl_${randomBytes(8).toString('hex')}`;
  const secret = randomBytes(24).toString('base64url');
  const expiresAt = nowIso(new Date(Date.now() + options.ttlMs));
  await store.writeTransaction(async (trx) => {
    const batch = await trx.selectFrom('batches').select(['id', 'expires_at']).where('id', '=', options.batch).executeTakeFirst();
    if (!batch) throw new HallmarkError('BATCH_NOT_FOUND', `no batch ${options.batch}`);
    if (batch.expires_at && new Date(batch.expires_at) <= new Date()) throw new HallmarkError('BATCH_EXPIRED', `batch ${batch.id} expired at ${batch.expires_at}`);
    await trx.insertInto('claims').values({
      id, batch_id: batch.id, secret_hash: hashSecret(secret), max_uses: options.uses, per_minute: perMinute, expires_at: expiresAt,
      revoked_at: null, created_by: options.actor, created_at: nowIso(), last_used_at: null,
    }).execute();
    await appendAudit(trx, [{ actor: options.actor, action: 'claim.create', target: id, details: { batch: batch.id, maxUses: options.uses, perMinute, expiresAt } }]);
  });
  return { id, secret, batch: options.batch, maxUses: options.uses, perMinute, expiresAt, basic: `${id}:${secret}` };
}

export async function revokeClaim(store: Store, id: string, actor: string): Promise<void> {
  await store.writeTransaction(async (trx) => {
    const r = await trx.updateTable('claims').set({ revoked_at: nowIso() }).where('id', '=', id).where('revoked_at', 'is', null).executeTakeFirst();
    if (Number(r.numUpdatedRows) === 0) throw new HallmarkError('NOT_FOUND', `no active claim ${id}`);
    await appendAudit(trx, [{ actor, action: 'claim.revoke', target: id }]);
  });
}

function claimInfo(r: ClaimRow, now = new Date()): ClaimInfo {
  const status = r.revoked_at ? 'revoked' : new Date(r.expires_at) <= now ? 'expired' : Number(r.used) >= Number(r.max_uses) ? 'used-up' : 'active';
  return {
    id: r.id, batch: r.batch_id, maxUses: Number(r.max_uses), used: Number(r.used), perMinute: Number(r.per_minute), expiresAt: r.expires_at,
    revokedAt: r.revoked_at, createdBy: r.created_by, createdAt: r.created_at, lastUsedAt: r.last_used_at, status,
  };
}

export async function listClaims(store: Store, options: { batch?: string } = {}): Promise<ClaimInfo[]> {
  let q = store.db.selectFrom('claims').selectAll();
  if (options.batch) q = q.where('batch_id', '=', options.batch);
  return (await q.orderBy('created_at').execute()).map((r) => claimInfo(r));
}

/** Parses "Basic base64(id:secret)". undefined when the header is not Basic at all. */
export function parseBasicCredentials(header: string | undefined): { id: string; secret: string } | undefined {
  if (!header || header.length > 1024) return undefined;
  const m = /^Basic\s+([A-Za-z0-9+/=]+)\s*$/i.exec(header);
  if (!m) return undefined;
  const text = Buffer.from(m[1]!, 'base64').toString('utf8');
  const colon = text.indexOf(':');
  if (colon < 0) return { id: text, secret: '' };
  return { id: text.slice(0, colon), secret: text.slice(colon + 1) };
}

/** The flags of a claim's batch that decide an enrolment with it (read with the claim). */
export interface ClaimBatchFlags {
  readonly batch_allow_unregistered: number;
  readonly batch_require_approval: number;
}

/**
 * Checks presented claim credentials. Every failure is audited (with the claim id when it names one, never
 * the secret) and answers with one message, so a caller learns nothing about which part was wrong.
 */
export async function checkClaim(store: Store, presented: { id: string; secret: string }, source: string): Promise<ClaimRow & ClaimBatchFlags> {
  const fail = async (why: string, id?: string): Promise<never> => {
    await store.writeTransaction((trx) => appendAudit(trx, [{ actor: source, action: 'claim.refused', target: id ?? '-', details: { reason: why } }]));
    throw new HallmarkError('CLAIM_INVALID', 'unknown, wrong, expired, revoked or used-up claim');
  };
  if (!/^cl_[0-9a-f]{16}$/.test(presented.id)) return fail('malformed claim id');
  // The batch's enrolment flags come with the claim: one read instead of three per claim enrolment.
  const row = (await rawSql<ClaimRow & ClaimBatchFlags>(store.db, store.dialect,
    'select c.*, b.allow_unregistered as batch_allow_unregistered, b.require_approval as batch_require_approval from claims c join batches b on b.id = c.batch_id where c.id = ?', [presented.id])).rows[0];
  if (!row) return fail('unknown claim', presented.id);
  const a = Buffer.from(row.secret_hash, 'hex');
  const b = Buffer.from(hashSecret(presented.secret), 'hex');
  if (!timingSafeEqual(a, b)) return fail('wrong secret', row.id);
  if (row.revoked_at) return fail('revoked', row.id);
  if (new Date(row.expires_at) <= new Date()) return fail('expired', row.id);
  if (Number(row.used) >= Number(row.max_uses)) return fail('used up', row.id);
  return row;
}

/**
 * Takes one use of a claim for a device, inside the issuance transaction: the device must not have
 * enrolled with it before, and the count only moves while it is below the limit (and the claim is
 * still live), so concurrent enrolments can never spend more uses than the claim has.
 */
export async function spendClaim(trx: Transaction<Database>, claimId: string, udid: string, actor: string, dialect: Dialect = 'sqlite'): Promise<AuditEvent[]> {
  // Hand-written SQL (src/store/raw-sql.ts): this runs for every claim enrolment.
  const prior = await rawSql(trx, dialect, 'select udid from claim_uses where claim_id = ? and udid = ?', [claimId, udid]);
  if (prior.rows.length > 0) throw new HallmarkError('CLAIM_ALREADY_USED', `device ${udid} has already enrolled with claim ${claimId}; renew with its current certificate`);
  const now = nowIso();
  const r = await rawSql(trx, dialect, 'update claims set used = used + 1, last_used_at = ? where id = ? and revoked_at is null and expires_at > ? and used < max_uses', [now, claimId, now]);
  if (r.changed !== 1) throw new HallmarkError('CLAIM_INVALID', `claim ${claimId} expired, was revoked or was used up`);
  await rawSql(trx, dialect, 'insert into claim_uses (claim_id, udid, at) values (?, ?, ?)', [claimId, udid, now]);
  return [{ actor, action: 'claim.use', target: claimId, details: { device: udid } }];
}

/** spendClaim as a step of an issuance transaction (it may run in the store's writer thread). */
export const SPEND_CLAIM = defineProcedure(import.meta.url, 'spendClaim', async (trx, dialect, a: { readonly claim: string; readonly udid: string; readonly actor: string }) =>
  ({ result: undefined, audit: await spendClaim(trx, a.claim, a.udid, a.actor, dialect) }));
