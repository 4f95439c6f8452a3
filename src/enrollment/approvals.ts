// Operator approval of first enrolments, for batches created with --require-approval. A device's first
// request is recorded as pending (EST answers 202 + Retry-After); the operator approves or rejects it
// (hallmark enrolment approve|reject ID); the device's next request with the same key then proceeds
// and spends the approval in the issuance's transaction. Every step is audited.

import { randomBytes } from 'node:crypto';
import type { Transaction } from 'kysely';
import { appendAudit, type AuditEvent } from '../audit/audit-log.js';
import { HallmarkError } from '../errors.js';
import { nowIso, type Store } from '../store/database.js';
import { defineProcedure } from '../store/procedures.js';
import type { Database, EnrolmentApprovalsTable } from '../store/schema.js';

/** What a waiting device is told: ask again after this many seconds. */
export const APPROVAL_RETRY_AFTER_SECONDS = 60;
/** Pending requests one batch may hold: a flood of unknown keys cannot grow the table without bound. */
export const MAX_PENDING_PER_BATCH = 10_000;

export interface ApprovalInfo {
  readonly id: string;
  readonly batch: string;
  readonly udid: string;
  readonly publicKeySha256: string;
  readonly status: EnrolmentApprovalsTable['status'];
  readonly authenticator: string;
  readonly source: string;
  readonly requestedAt: string;
  readonly decidedAt: string | null;
  readonly decidedBy: string | null;
  readonly reason: string | null;
}

const pending = (id: string): HallmarkError =>
  Object.assign(new HallmarkError('ENROLMENT_PENDING', `enrolment request ${id} waits for an operator's approval; ask again later`), { retryAfterSeconds: APPROVAL_RETRY_AFTER_SECONDS });

/**
 * Before a first enrolment in a batch that requires approval: returns the id of the approval to spend,
 * or throws ENROLMENT_PENDING (recording the request when it is new) or ENROLMENT_REJECTED.
 */
export async function requireApproval(store: Store, request: { batch: string; udid: string; keySha256: string; authenticator: string; source: string; actor: string }): Promise<string> {
  const latest = await store.db.selectFrom('enrolment_approvals').selectAll()
    .where('udid', '=', request.udid).where('public_key_sha256', '=', request.keySha256).where('status', '!=', 'used')
    .orderBy('requested_at', 'desc').limit(1).executeTakeFirst();
  if (latest?.status === 'approved') return latest.id;
  if (latest?.status === 'rejected') throw new HallmarkError('ENROLMENT_REJECTED', `enrolment request ${latest.id} was rejected by ${latest.decided_by ?? 'an operator'}${latest.reason ? `: ${latest.reason}` : ''}`);
  if (latest?.status === 'pending') throw pending(latest.id);
  const id = `er_${randomBytes(8).toString('hex')}`;
  await store.writeTransaction(async (trx) => {
    const waiting = await trx.selectFrom('enrolment_approvals').select((eb) => eb.fn.countAll<number>().as('n')).where('batch_id', '=', request.batch).where('status', '=', 'pending').executeTakeFirstOrThrow();
    if (Number(waiting.n) >= MAX_PENDING_PER_BATCH) throw Object.assign(new HallmarkError('RATE_LIMITED', `batch ${request.batch} already has ${MAX_PENDING_PER_BATCH} enrolments waiting for approval`), { retryAfterSeconds: APPROVAL_RETRY_AFTER_SECONDS });
    await trx.insertInto('enrolment_approvals').values({
      id, batch_id: request.batch, udid: request.udid, public_key_sha256: request.keySha256, status: 'pending', authenticator: request.authenticator,
      source: request.source, requested_at: nowIso(), decided_at: null, decided_by: null, reason: null,
    }).execute();
    await appendAudit(trx, [{ actor: request.actor, action: 'enrolment.pending', target: id, details: { batch: request.batch, device: request.udid, authenticator: request.authenticator, source: request.source } }]);
  });
  throw pending(id);
}

/** Inside the issuance transaction: spends an approval (once). */
export async function spendApproval(trx: Transaction<Database>, id: string, actor: string): Promise<AuditEvent[]> {
  const r = await trx.updateTable('enrolment_approvals').set({ status: 'used' }).where('id', '=', id).where('status', '=', 'approved').executeTakeFirst();
  if (Number(r.numUpdatedRows) !== 1) throw new HallmarkError('ENROLMENT_REJECTED', `enrolment approval ${id} is no longer valid`);
  return [{ actor, action: 'enrolment.approval_used', target: id }];
}

/** spendApproval as a step of an issuance transaction (it may run in the store's writer thread). */
export const SPEND_APPROVAL = defineProcedure(import.meta.url, 'spendApproval', async (trx, _dialect, a: { readonly approval: string; readonly actor: string }) =>
  ({ result: undefined, audit: await spendApproval(trx, a.approval, a.actor) }));

export async function decideApproval(store: Store, id: string, decision: 'approve' | 'reject', actor: string, reason?: string): Promise<ApprovalInfo> {
  if (reason !== undefined && reason.length > 500) throw new HallmarkError('BAD_REQUEST', 'the reason is at most 500 characters');
  await store.writeTransaction(async (trx) => {
    const row = await trx.selectFrom('enrolment_approvals').select(['status', 'udid', 'batch_id']).where('id', '=', id).executeTakeFirst();
    if (!row) throw new HallmarkError('NOT_FOUND', `no enrolment request ${id}`);
    if (row.status !== 'pending') throw new HallmarkError('ILLEGAL_TRANSITION', `enrolment request ${id} is ${row.status}, not pending`);
    await trx.updateTable('enrolment_approvals').set({ status: decision === 'approve' ? 'approved' : 'rejected', decided_at: nowIso(), decided_by: actor, reason: reason ?? null }).where('id', '=', id).execute();
    await appendAudit(trx, [{ actor, action: decision === 'approve' ? 'enrolment.approve' : 'enrolment.reject', target: id, details: { device: row.udid, batch: row.batch_id, reason: reason ?? null } }]);
  });
  return (await listApprovals(store, { id }))[0]!;
}

export async function listApprovals(store: Store, options: { status?: EnrolmentApprovalsTable['status']; batch?: string; id?: string; limit?: number } = {}): Promise<ApprovalInfo[]> {
  let q = store.db.selectFrom('enrolment_approvals').selectAll();
  if (options.status) q = q.where('status', '=', options.status);
  if (options.batch) q = q.where('batch_id', '=', options.batch);
  if (options.id) q = q.where('id', '=', options.id);
  const rows = await q.orderBy('requested_at').limit(Math.min(Math.max(options.limit ?? 1000, 1), 10_000)).execute();
  return rows.map((r) => ({
    id: r.id, batch: r.batch_id, udid: r.udid, publicKeySha256: r.public_key_sha256, status: r.status, authenticator: r.authenticator, source: r.source,
    requestedAt: r.requested_at, decidedAt: r.decided_at, decidedBy: r.decided_by, reason: r.reason,
  }));
}
