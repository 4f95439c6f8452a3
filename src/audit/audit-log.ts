// Append-only, hash-chained audit log. Entry n stores hash_n = SHA-256(hash_{n-1} || canonical(entry n)),
// so changing, removing or reordering any entry breaks the chain from that entry on.
// Entries are written inside the same write transaction as the change they record.

import { createHash } from 'node:crypto';
import type { Kysely, Transaction } from 'kysely';
import type { AuditRow, Database } from '../store/schema.js';

export const GENESIS_HASH = '0'.repeat(64);

export interface AuditEvent {
  /** Who: "cli:<user>", "token:<id>", "system", "ip:<addr>" … */
  readonly actor: string;
  /** What, as a dotted verb: "certificate.issue", "ca.install", "token.create", "auth.failed" … */
  readonly action: string;
  /** What it was done to: a serial, a CA name, a token id. */
  readonly target: string;
  /** Extra facts. Never a secret, key or token. */
  readonly details?: Readonly<Record<string, unknown>>;
}

function entryHash(prevHash: string, row: Omit<AuditRow, 'hash' | 'prev_hash'>): string {
  const canonical = JSON.stringify([row.seq, row.at, row.actor, row.action, row.target, row.details]);
  return createHash('sha256').update(prevHash).update('\n').update(canonical).digest('hex');
}

/** Appends events in order. Must run inside Store.writeTransaction (which serialises writers). */
export async function appendAudit(trx: Transaction<Database>, events: readonly AuditEvent[], at = new Date()): Promise<void> {
  if (events.length === 0) return;
  const last = await trx.selectFrom('audit_log').select(['seq', 'hash']).orderBy('seq', 'desc').limit(1).executeTakeFirst();
  let seq = last ? Number(last.seq) : 0;
  let prev = last ? last.hash : GENESIS_HASH;
  const when = at.toISOString();
  const rows: AuditRow[] = [];
  for (const e of events) {
    seq += 1;
    const base = { seq, at: when, actor: e.actor, action: e.action, target: e.target, details: JSON.stringify(e.details ?? {}) };
    const hash = entryHash(prev, base);
    rows.push({ ...base, prev_hash: prev, hash });
    prev = hash;
  }
  // Chunked: SQLite allows at most 32766 bound parameters per statement.
  for (let i = 0; i < rows.length; i += 500) await trx.insertInto('audit_log').values(rows.slice(i, i + 500)).execute();
}

export type AuditVerdict =
  | { readonly ok: true; readonly entries: number; readonly headHash: string }
  | { readonly ok: false; readonly entries: number; readonly seq: number; readonly reason: string };

/** Walks the whole chain in pages and reports the first entry that was changed, removed or reordered. */
export async function verifyAuditLog(db: Kysely<Database>, pageSize = 2000): Promise<AuditVerdict> {
  let expectedSeq = 1;
  let prev = GENESIS_HASH;
  let count = 0;
  for (;;) {
    const page = await db.selectFrom('audit_log').selectAll().where('seq', '>=', expectedSeq).orderBy('seq').limit(pageSize).execute();
    for (const raw of page) {
      const row = { ...raw, seq: Number(raw.seq) };
      if (row.seq !== expectedSeq) {
        return { ok: false, entries: count, seq: expectedSeq, reason: `entry ${expectedSeq} is missing (removed); the next entry is ${row.seq}` };
      }
      if (row.prev_hash !== prev) {
        return { ok: false, entries: count, seq: row.seq, reason: `entry ${row.seq} does not follow entry ${row.seq - 1} (its previous-hash differs: reordered or replaced)` };
      }
      const recomputed = entryHash(prev, row);
      if (recomputed !== row.hash) {
        return { ok: false, entries: count, seq: row.seq, reason: `entry ${row.seq} was changed (its content does not match its hash)` };
      }
      prev = row.hash;
      expectedSeq += 1;
      count += 1;
    }
    if (page.length < pageSize) break;
  }
  return { ok: true, entries: count, headHash: prev };
}

export interface AuditEntry {
  readonly seq: number;
  readonly at: string;
  readonly actor: string;
  readonly action: string;
  readonly target: string;
  readonly details: Record<string, unknown>;
  readonly hash: string;
}

export async function listAudit(db: Kysely<Database>, options: { after?: number; limit?: number; action?: string } = {}): Promise<AuditEntry[]> {
  let q = db.selectFrom('audit_log').selectAll().where('seq', '>', options.after ?? 0);
  if (options.action) q = q.where('action', '=', options.action);
  const rows = await q.orderBy('seq').limit(Math.min(options.limit ?? 100, 1000)).execute();
  return rows.map((r) => ({ seq: Number(r.seq), at: r.at, actor: r.actor, action: r.action, target: r.target, details: JSON.parse(r.details) as Record<string, unknown>, hash: r.hash }));
}
