// Revocation: one certificate, a device, a batch, a production line or everything one CA issued.
// One transaction per request; one audit entry per revoked certificate plus one for the request; the
// 'revoked' event is emitted after the commit so CRLs and OCSP answers change at once.
//
// A device revoked as such ends in state `revoked` (it may not enrol again). A batch, line or CA
// revocation revokes certificates only: the devices keep their hardware identity and re-enrol (the
// line compromise drill: their next enrolment lands on the line's new CA).

import type { Transaction } from 'kysely';
import { appendAudit, type AuditEvent } from '../audit/audit-log.js';
import { HallmarkError } from '../errors.js';
import { normaliseSerialHex } from '../pki/certificate.js';
import { normaliseUdid } from '../registry/registry.js';
import { nowIso, type Store } from '../store/database.js';
import type { Database } from '../store/schema.js';

/** RFC 5280 §5.3.1 CRLReason codes (8, removeFromCRL, only appears in delta CRLs and is not a reason one revokes with). */
export const REVOCATION_REASONS = {
  unspecified: 0,
  keyCompromise: 1,
  cACompromise: 2,
  affiliationChanged: 3,
  superseded: 4,
  cessationOfOperation: 5,
  certificateHold: 6,
  privilegeWithdrawn: 9,
  aACompromise: 10,
} as const;
export type RevocationReason = keyof typeof REVOCATION_REASONS;

export function parseRevocationReason(text: string | undefined): RevocationReason {
  if (text === undefined) return 'unspecified';
  const found = (Object.keys(REVOCATION_REASONS) as RevocationReason[]).find((r) => r.toLowerCase() === text.trim().toLowerCase());
  if (!found) throw new HallmarkError('BAD_REQUEST', `unknown revocation reason ${JSON.stringify(text)} (one of ${Object.keys(REVOCATION_REASONS).join(', ')})`);
  return found;
}

export type RevocationTarget =
  | { readonly serial: string; readonly ca?: string }
  | { readonly device: string }
  | { readonly batch: string }
  | { readonly line: string }
  | { readonly ca: string };

export interface RevokedEvent {
  readonly issuerId: number;
  readonly issuer: string;
  readonly serials: readonly string[];
  readonly reason: RevocationReason;
  readonly at: Date;
}

export interface RevocationResult {
  readonly revoked: number;
  /** Per issuing CA name: its id and the serials revoked. */
  readonly byIssuer: ReadonlyMap<string, { readonly issuerId: number; readonly serials: readonly string[] }>;
  readonly reason: RevocationReason;
  readonly at: Date;
}

interface Candidate { readonly id: number; readonly serial: string; readonly issuer_id: number; readonly issuer: string; readonly device_udid: string | null }

/** What a target names, for messages and the audit log. */
export function describeTarget(t: RevocationTarget): string {
  if ('serial' in t) return `certificate ${t.serial}${t.ca ? ` of ${t.ca}` : ''}`;
  if ('device' in t) return `device ${t.device}`;
  if ('batch' in t) return `batch ${t.batch}`;
  if ('line' in t) return `line ${t.line}`;
  return `CA ${t.ca}`;
}

async function candidates(trx: Transaction<Database>, target: RevocationTarget): Promise<Candidate[]> {
  const base = trx.selectFrom('certificates').innerJoin('certificate_authorities as ca', 'ca.id', 'certificates.issuer_id')
    .select(['certificates.id', 'certificates.serial', 'certificates.issuer_id', 'ca.name as issuer', 'certificates.device_udid', 'certificates.status', 'certificates.profile']);
  if ('serial' in target) {
    const serial = normaliseSerialHex(target.serial);
    let q = base.where('certificates.serial', '=', serial);
    if (target.ca) q = q.where('ca.name', '=', target.ca);
    const rows = await q.execute();
    if (rows.length === 0) throw new HallmarkError('CERTIFICATE_NOT_FOUND', `no certificate with serial ${serial}${target.ca ? ` issued by ${target.ca}` : ''}`);
    if (rows.length > 1) throw new HallmarkError('BAD_REQUEST', `serial ${serial} was issued by several CAs (${rows.map((r) => r.issuer).join(', ')}): name one with --ca`);
    const row = rows[0]!;
    if (row.profile === 'intermediate' || row.profile === 'root') throw new HallmarkError('BAD_REQUEST', 'a CA certificate is revoked by its issuer, the offline root (hallmark root revoke)');
    if (row.status !== 'valid') throw new HallmarkError('ILLEGAL_TRANSITION', `certificate ${serial} is already ${row.status}`);
    return [row];
  }
  const valid = base.where('certificates.status', '=', 'valid').where('certificates.profile', 'not in', ['root', 'intermediate']);
  if ('device' in target) {
    return valid.where('certificates.device_udid', '=', normaliseUdid(target.device)).execute();
  }
  if ('batch' in target) {
    if (!(await trx.selectFrom('batches').select('id').where('id', '=', target.batch).executeTakeFirst())) throw new HallmarkError('BATCH_NOT_FOUND', `no batch ${target.batch}`);
    return valid.where('certificates.device_udid', 'in', (eb) => eb.selectFrom('devices').select('udid').where('batch_id', '=', target.batch)).execute();
  }
  if ('line' in target) {
    // The line's devices' certificates (lines may share a CA: revoke everything a CA issued with --ca).
    const line = await trx.selectFrom('lines').select(['id']).where('name', '=', target.line).executeTakeFirst();
    if (!line) throw new HallmarkError('LINE_NOT_FOUND', `no line named ${target.line}`);
    return valid.where('certificates.device_udid', 'in', (eb) => eb.selectFrom('devices').select('udid').where('line_id', '=', line.id)).execute();
  }
  const ca = await trx.selectFrom('certificate_authorities').select(['id', 'role']).where('name', '=', target.ca).executeTakeFirst();
  if (!ca) throw new HallmarkError('CA_NOT_FOUND', `no CA named ${target.ca}`);
  if (ca.role === 'root') throw new HallmarkError('BAD_REQUEST', 'the root signs only through the root ceremony: revoke intermediates with hallmark root revoke');
  return valid.where('certificates.issuer_id', '=', ca.id).execute();
}

/** Revokes what `target` names. Returns what was revoked, by issuer. */
export async function revokeCertificates(store: Store, target: RevocationTarget, reason: RevocationReason, actor: string): Promise<RevocationResult> {
  const at = new Date();
  const when = nowIso(at);
  const byIssuer = new Map<string, { id: number; serials: string[] }>();
  await store.writeTransaction(async (trx) => {
    if ('device' in target) {
      const udid = normaliseUdid(target.device);
      const device = await trx.selectFrom('devices').select('state').where('udid', '=', udid).executeTakeFirst();
      if (!device) throw new HallmarkError('DEVICE_NOT_FOUND', `no device with UDID ${target.device}`);
      if (device.state === 'revoked' || device.state === 'decommissioned') throw new HallmarkError('ILLEGAL_TRANSITION', `device ${udid} is already ${device.state}`);
    }
    const rows = await candidates(trx, target);
    const events: AuditEvent[] = [];
    // Chunked: SQLite allows at most 32766 bound parameters per statement.
    for (let i = 0; i < rows.length; i += 500) {
      const ids = rows.slice(i, i + 500).map((r) => r.id);
      await trx.updateTable('certificates').set({ status: 'revoked', revoked_at: when, revocation_reason: reason }).where('id', 'in', ids).where('status', '=', 'valid').execute();
    }
    for (const r of rows) {
      let entry = byIssuer.get(r.issuer);
      if (!entry) byIssuer.set(r.issuer, (entry = { id: r.issuer_id, serials: [] }));
      entry.serials.push(r.serial);
      events.push({ actor, action: 'certificate.revoke', target: r.serial, details: { issuer: r.issuer, reason, device: r.device_udid, by: describeTarget(target) } });
    }
    if ('device' in target) {
      const udid = normaliseUdid(target.device);
      const before = await trx.selectFrom('devices').select('state').where('udid', '=', udid).executeTakeFirstOrThrow();
      await trx.updateTable('devices').set({ state: 'revoked', updated_at: when }).where('udid', '=', udid).execute();
      events.push({ actor, action: 'device.revoke', target: udid, details: { from: before.state, to: 'revoked', reason, certificatesRevoked: rows.length } });
    } else if (!('serial' in target)) {
      events.push({ actor, action: 'revocation.bulk', target: describeTarget(target), details: { reason, certificatesRevoked: rows.length, issuers: [...byIssuer.keys()] } });
    }
    await appendAudit(trx, events, at);
  });
  return { revoked: rowsCount(byIssuer), byIssuer: new Map([...byIssuer].map(([k, v]) => [k, { issuerId: v.id, serials: v.serials }])), reason, at };
}

const rowsCount = (m: Map<string, { serials: string[] }>): number => [...m.values()].reduce((n, e) => n + e.serials.length, 0);

/** The 'revoked' events for a result, one per issuer. */
export function revokedEvents(result: RevocationResult): RevokedEvent[] {
  return [...result.byIssuer].map(([issuer, e]) => ({ issuerId: e.issuerId, issuer, serials: e.serials, reason: result.reason, at: result.at }));
}
