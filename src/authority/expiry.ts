// The expiry report: valid certificates (not revoked, not yet expired) that expire within a window.
// Device certificates are grouped by product / line / batch; other end-entity certificates (tls-server,
// ocsp-signer, operator-issued ones without a device) are listed apart. Counts per ISO week (weeks start
// on Monday, UTC) feed a chart. CA certificates are not in it (their expiry is a root ceremony matter).

import { HallmarkError } from '../errors.js';
import { nowIso, type Store } from '../store/database.js';
import { parseDuration } from './tokens.js';

export const DEFAULT_EXPIRY_WITHIN = '30d';
const MAX_WITHIN_MS = 5 * 365 * 86400e3;
const DAY_MS = 86400e3;

export interface ExpiringDeviceCertificate {
  readonly serial: string;
  readonly issuer: string;
  readonly profile: string;
  readonly notAfter: string;
  readonly daysLeft: number;
  readonly device: string;
  readonly serialNumber: string | null;
  readonly deviceState: string;
  readonly tenant: string;
  readonly product: string;
  readonly line: string;
  readonly batch: string;
}

export interface ExpiringOtherCertificate {
  readonly serial: string;
  readonly issuer: string;
  readonly profile: string;
  readonly subject: string;
  readonly notAfter: string;
  readonly daysLeft: number;
}

export interface ExpiryGroup {
  readonly product: string;
  readonly line: string;
  readonly batch: string;
  readonly count: number;
  /** The first notAfter of the group. */
  readonly earliest: string;
  readonly certificates: ExpiringDeviceCertificate[];
}

export interface ExpiryWeek { readonly week: string; readonly devices: number; readonly others: number; readonly total: number }

export interface ExpiryReport {
  readonly generatedAt: string;
  readonly within: string;
  readonly until: string;
  readonly total: number;
  readonly devices: number;
  readonly others: number;
  readonly groups: ExpiryGroup[];
  readonly otherCertificates: ExpiringOtherCertificate[];
  /** One entry per ISO week from this week to the week of `until`, zeros included. */
  readonly weeks: ExpiryWeek[];
  /** Certificates listed per group and in otherCertificates are capped at `limit`; counts are complete. */
  readonly truncated: boolean;
}

/** "30d", "2w", "12h" -> ms, between 1 s and 5 years. */
export function parseWithin(text: string | undefined): number {
  const ms = parseDuration(text ?? DEFAULT_EXPIRY_WITHIN);
  if (ms > MAX_WITHIN_MS) throw new HallmarkError('BAD_DURATION', 'the window may be at most 5 years');
  return ms;
}

/** Monday (UTC) of the ISO week of `d`, as YYYY-MM-DD. */
export function isoWeekStart(d: Date): string {
  const day = new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate()));
  const offset = (day.getUTCDay() + 6) % 7; // Monday 0 … Sunday 6
  return new Date(day.getTime() - offset * DAY_MS).toISOString().slice(0, 10);
}

export async function expiryReport(store: Store, options: { within?: string; now?: Date; limit?: number } = {}): Promise<ExpiryReport> {
  const within = options.within ?? DEFAULT_EXPIRY_WITHIN;
  const withinMs = parseWithin(within);
  const now = options.now ?? new Date();
  const until = new Date(now.getTime() + withinMs);
  const limit = Math.max(1, Math.min(options.limit ?? 1000, 100_000));
  const rows = await store.db.selectFrom('certificates as c')
    .innerJoin('certificate_authorities as ca', 'ca.id', 'c.issuer_id')
    .leftJoin('devices as d', 'd.udid', 'c.device_udid')
    .leftJoin('products as p', 'p.id', 'd.product_id')
    .leftJoin('lines as l', 'l.id', 'd.line_id')
    .select(['c.serial', 'ca.name as issuer', 'c.profile', 'c.subject', 'c.not_after', 'c.device_udid', 'd.serial_number', 'd.state', 'd.tenant', 'd.batch_id', 'p.name as product', 'l.name as line'])
    .where('c.status', '=', 'valid')
    .where('c.profile', 'not in', ['root', 'intermediate'])
    .where('c.not_after', '>', nowIso(now))
    .where('c.not_after', '<=', nowIso(until))
    .orderBy('c.not_after').orderBy('c.serial')
    .execute();

  const daysLeft = (notAfter: string): number => Math.max(0, Math.floor((Date.parse(notAfter) - now.getTime()) / DAY_MS));
  const groups = new Map<string, { product: string; line: string; batch: string; count: number; earliest: string; certificates: ExpiringDeviceCertificate[] }>();
  const others: ExpiringOtherCertificate[] = [];
  const weeks = new Map<string, { devices: number; others: number }>();
  for (let w = new Date(isoWeekStart(now)); w.getTime() <= until.getTime(); w = new Date(w.getTime() + 7 * DAY_MS)) weeks.set(w.toISOString().slice(0, 10), { devices: 0, others: 0 });
  let listed = 0;
  let truncated = false;
  let deviceCount = 0;
  for (const r of rows) {
    const week = weeks.get(isoWeekStart(new Date(r.not_after)));
    if (r.device_udid && r.batch_id && r.product && r.line) {
      deviceCount += 1;
      if (week) week.devices += 1;
      const key = `${r.product}\u0000${r.line}\u0000${r.batch_id}`;
      let g = groups.get(key);
      if (!g) groups.set(key, (g = { product: r.product, line: r.line, batch: r.batch_id, count: 0, earliest: r.not_after, certificates: [] }));
      g.count += 1;
      if (listed < limit) {
        listed += 1;
        g.certificates.push({
          serial: r.serial, issuer: r.issuer, profile: r.profile, notAfter: r.not_after, daysLeft: daysLeft(r.not_after), device: r.device_udid,
          serialNumber: r.serial_number ?? null, deviceState: r.state ?? 'unknown', tenant: r.tenant ?? '', product: r.product, line: r.line, batch: r.batch_id,
        });
      } else truncated = true;
    } else {
      if (week) week.others += 1;
      if (listed < limit) {
        listed += 1;
        others.push({ serial: r.serial, issuer: r.issuer, profile: r.profile, subject: r.subject, notAfter: r.not_after, daysLeft: daysLeft(r.not_after) });
      } else truncated = true;
    }
  }
  const groupList = [...groups.values()].sort((a, b) => a.earliest.localeCompare(b.earliest) || a.product.localeCompare(b.product) || a.line.localeCompare(b.line) || a.batch.localeCompare(b.batch));
  return {
    generatedAt: nowIso(now), within, until: nowIso(until), total: rows.length, devices: deviceCount, others: rows.length - deviceCount,
    groups: groupList, otherCertificates: others,
    weeks: [...weeks].map(([week, c]) => ({ week, devices: c.devices, others: c.others, total: c.devices + c.others })),
    truncated,
  };
}
