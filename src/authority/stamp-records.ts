// The store side of factory stamps (src/authority/stamping.ts): one chunk of devices, certificates,
// stamp rows and audit entries as a named procedure (src/store/procedures.ts), so that on SQLite the
// statements, WAL writes and fsync of a chunk run on the writer thread while the event loop makes the
// next chunk's keys and certificates. Arguments are plain data (Buffers arrive as Uint8Array).

import type { Transaction } from 'kysely';
import type { AuditEvent } from '../audit/audit-log.js';
import { HallmarkError } from '../errors.js';
import { nowIso, type Dialect } from '../store/database.js';
import { asBuffer, defineProcedure } from '../store/procedures.js';
import { rawSql } from '../store/raw-sql.js';
import type { Database } from '../store/schema.js';

export interface StampChunkRow {
  readonly seq: number;
  readonly udid: string;
  readonly spki: Uint8Array;
  readonly serialNumber: string;
  readonly certificateSerial: string;
  readonly subject: string;
  readonly fingerprint: string;
  readonly notBefore: string;
  readonly notAfter: string;
  readonly der: Uint8Array;
  /** The stamp's secrets, sealed (AES-256-GCM) by the caller. */
  readonly pending: Uint8Array;
}

export interface StampChunk {
  readonly runId: string;
  readonly batchId: string;
  readonly quota: number;
  readonly productId: number;
  readonly lineId: number;
  readonly lineName: string;
  readonly caName: string;
  readonly issuerId: number;
  readonly profile: string;
  readonly tenant: string;
  readonly actor: string;
  readonly rows: readonly StampChunkRow[];
  /** Stamps of earlier chunks whose files are now written (recorded; their secrets are kept until the run is flushed). */
  readonly written: readonly string[];
}

const SQLITE_MAX_PARAMETERS = 32_000;

async function insertRows(trx: Transaction<Database>, dialect: Dialect, table: string, columns: readonly string[], rows: readonly unknown[][]): Promise<void> {
  const perStatement = Math.max(1, Math.floor(SQLITE_MAX_PARAMETERS / columns.length));
  const tuple = `(${columns.map(() => '?').join(', ')})`;
  for (let i = 0; i < rows.length; i += perStatement) {
    const part = rows.slice(i, i + perStatement);
    await rawSql(trx, dialect, `insert into ${table} (${columns.join(', ')}) values ${part.map(() => tuple).join(', ')}`, part.flat());
  }
}

/**
 * Records that these stamps' files are written. Their secrets stay (encrypted) until the files are known
 * to be on disk — forgetStampSecrets, after the file system is flushed — so a power cut cannot lose a
 * device's only key.
 */
export async function markStampsWritten(trx: Transaction<Database>, dialect: Dialect, udids: readonly string[], at: string): Promise<void> {
  for (let i = 0; i < udids.length; i += 500) {
    const part = udids.slice(i, i + 500);
    await rawSql(trx, dialect, `update stamps set written_at = ? where written_at is null and udid in (${part.map(() => '?').join(', ')})`, [at, ...part]);
  }
}

/** Clears the kept secrets of a run whose files (or archive) are flushed to disk. */
export async function forgetStampSecrets(trx: Transaction<Database>, dialect: Dialect, runId: string, at: string): Promise<void> {
  await rawSql(trx, dialect, 'update stamps set pending = null, written_at = coalesce(written_at, ?) where run_id = ? and pending is not null', [at, runId]);
}

export const STORE_STAMP_CHUNK = defineProcedure(import.meta.url, 'storeStampChunk', async (trx, dialect, c: StampChunk) => {
  const now = nowIso();
  await markStampsWritten(trx, dialect, c.written, now);
  // The owner's heartbeat: another host takes an unfinished run over only after it has gone quiet.
  await rawSql(trx, dialect, 'update stamp_runs set heartbeat_at = ? where id = ?', [now, c.runId]);
  const n = c.rows.length;
  // The quota for the whole chunk at once, atomically: the UPDATE only applies below quota.
  const taken = await rawSql(trx, dialect, 'update batches set issued_count = issued_count + ? where id = ? and issued_count + ? <= quota', [n, c.batchId, n]);
  if (taken.changed !== 1) throw new HallmarkError('QUOTA_EXCEEDED', `batch ${c.batchId} has no quota left for ${n} more devices (quota ${c.quota}, line ${c.lineName})`);
  await insertRows(trx, dialect, 'devices', ['udid', 'public_key_spki', 'public_key_sha256', 'serial_number', 'product_id', 'line_id', 'batch_id', 'tenant', 'birth_cert_der', 'state', 'created_at', 'updated_at', 'provisioned_at'],
    c.rows.map((r) => [r.udid, asBuffer(r.spki), r.udid, r.serialNumber, c.productId, c.lineId, c.batchId, c.tenant, null, 'provisioned', now, now, now]));
  await insertRows(trx, dialect, 'certificates', ['issuer_id', 'serial', 'profile', 'subject', 'fingerprint_sha256', 'not_before', 'not_after', 'der', 'status', 'revoked_at', 'revocation_reason', 'requested_by', 'created_at', 'device_udid'],
    c.rows.map((r) => [c.issuerId, r.certificateSerial, c.profile, r.subject, r.fingerprint, r.notBefore, r.notAfter, asBuffer(r.der), 'valid', null, null, c.actor, now, r.udid]));
  await insertRows(trx, dialect, 'stamps', ['udid', 'run_id', 'batch_id', 'seq', 'certificate_serial', 'pending', 'written_at', 'flashed_at', 'created_at'],
    c.rows.map((r) => [r.udid, c.runId, c.batchId, r.seq, r.certificateSerial, asBuffer(r.pending), null, null, now]));
  // One entry per device records both changes — its registration (registered: 'stamp', serial number,
  // tenant) and its certificate — which halves the audit rows of a run of 100,000.
  const audit: AuditEvent[] = c.rows.map((r) => ({
    actor: c.actor, action: 'certificate.issue', target: r.certificateSerial, details: {
      device: r.udid, batch: c.batchId, line: c.lineName, issuer: c.caName, profile: c.profile, subject: r.subject, fingerprintSha256: r.fingerprint,
      firstIdentity: true, notAfter: r.notAfter, serverKeygen: true, registered: 'stamp', serialNumber: r.serialNumber, tenant: c.tenant,
      stampRun: c.runId, stampSeq: r.seq,
    },
  }));
  return { result: undefined, audit };
});
