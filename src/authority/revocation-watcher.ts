// Revocations made by another process (the CLI beside a running server, another server on the same
// PostgreSQL database, a decommission through the registry) reach this process's CRL and OCSP caches by
// polling the store: every interval, each CA's certificates revoked since the last look. Revocations made
// through this process's Authority.revoke are announced at once and not again.

import type { Authority } from './authority.js';
import type { RevocationReason, RevokedEvent } from './revocation.js';

/** Serials announced recently, so a poll does not announce them twice (bounded; old ones drop out). */
export class AnnouncedRevocations {
  readonly #seen = new Map<string, number>();
  readonly #max: number;
  constructor(max = 200_000) { this.#max = max; }

  /** Marks serials as announced; returns those that were not yet. */
  fresh(issuerId: number, serials: readonly string[]): string[] {
    const out: string[] = [];
    for (const s of serials) {
      const key = `${issuerId}:${s}`;
      if (this.#seen.has(key)) continue;
      this.#seen.set(key, Date.now());
      out.push(s);
    }
    if (this.#seen.size > this.#max) {
      let drop = this.#seen.size - this.#max / 2;
      for (const k of this.#seen.keys()) { if (drop-- <= 0) break; this.#seen.delete(k); }
    }
    return out;
  }
}

export function watchRevocations(authority: Authority, announced: AnnouncedRevocations, intervalMs = 1000): () => void {
  // Look back a little: a transaction that committed late may carry an earlier revoked_at.
  const OVERLAP_MS = 5000;
  let since = new Date(Date.now() - OVERLAP_MS).toISOString();
  let running = false;
  const poll = async (): Promise<void> => {
    if (running) return;
    running = true;
    try {
      const started = new Date();
      const cas = await authority.store.db.selectFrom('certificate_authorities').select(['id', 'name']).execute();
      for (const ca of cas) {
        const rows = await authority.store.db.selectFrom('certificates').select(['serial', 'revocation_reason', 'revoked_at'])
          .where('issuer_id', '=', ca.id).where('status', '=', 'revoked').where('revoked_at', '>=', since).execute();
        const byReason = new Map<string, string[]>();
        for (const r of rows) {
          const reason = r.revocation_reason ?? 'unspecified';
          byReason.set(reason, [...(byReason.get(reason) ?? []), r.serial]);
        }
        for (const [reason, serials] of byReason) {
          const fresh = announced.fresh(ca.id, serials);
          if (fresh.length === 0) continue;
          const event: RevokedEvent = { issuerId: ca.id, issuer: ca.name, serials: fresh, reason: reason as RevocationReason, at: new Date() };
          authority.events.emit('revoked', event);
        }
      }
      since = new Date(started.getTime() - OVERLAP_MS).toISOString();
    } catch {
      // The store is unreachable for a moment: the next poll looks again from the same point.
    } finally {
      running = false;
    }
  };
  const timer = setInterval(() => void poll(), intervalMs);
  timer.unref();
  return () => clearInterval(timer);
}
