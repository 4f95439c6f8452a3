// Admin API bearer tokens: "hm_<id>_<secret>". Only SHA-256(secret) is stored; the token is
// shown once at creation. Every creation and every failed authentication is audited.

import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { appendAudit } from '../audit/audit-log.js';
import { HallmarkError } from '../errors.js';
import type { Store } from '../store/database.js';
import { nowIso } from '../store/database.js';

export const SCOPES = {
  admin: 'everything below',
  'ca:read': 'list and export CAs',
  'certificates:read': 'look up issued certificates',
  'certificates:issue': 'issue certificates from CSRs',
  'certificates:revoke': 'revoke certificates, devices, batches, lines',
  'audit:read': 'read and verify the audit log',
  'registry:read': 'read products, lines, batches, devices and vendors',
  'registry:write': 'create products, lines, batches; register, transfer, suspend, resume, decommission devices; trust vendors',
  'tokens:write': 'create and revoke API tokens',
  'webhooks:read': 'list webhooks and their deliveries',
  'webhooks:write': 'create and disable webhooks, retry deliveries',
} as const;
export type Scope = keyof typeof SCOPES;

export function parseScopes(text: string): Scope[] {
  const scopes = text.split(/[\s,]+/).filter(Boolean);
  if (scopes.length === 0) throw new HallmarkError('BAD_SCOPE', `no scope given (one or more of ${Object.keys(SCOPES).join(', ')})`);
  for (const s of scopes) if (!(s in SCOPES)) throw new HallmarkError('BAD_SCOPE', `unknown scope ${JSON.stringify(s)} (one of ${Object.keys(SCOPES).join(', ')})`);
  return [...new Set(scopes)] as Scope[];
}

/** "90d", "12h", "30m", "2y", "3600s" -> milliseconds. */
export function parseDuration(text: string): number {
  const m = /^(\d{1,6})\s*(s|m|h|d|w|y)$/.exec(text.trim());
  if (!m) throw new HallmarkError('BAD_DURATION', `not a duration: ${JSON.stringify(text)} (e.g. 90d, 12h, 30m, 2y)`);
  const unit = { s: 1e3, m: 60e3, h: 3600e3, d: 86400e3, w: 7 * 86400e3, y: 365 * 86400e3 }[m[2] as 's'];
  const ms = Number(m[1]) * unit;
  if (ms <= 0) throw new HallmarkError('BAD_DURATION', 'the duration must be positive');
  return ms;
}

const hashSecret = (secret: string): string => createHash('sha256').update(secret).digest('hex');

export interface CreatedToken { readonly id: string; readonly token: string; readonly scopes: readonly Scope[]; readonly expiresAt: string | null }

export async function createToken(store: Store, options: { scopes: readonly Scope[]; ttlMs?: number; name?: string; actor: string }): Promise<CreatedToken> {
  const id = randomBytes(8).toString('hex');
  const secret = randomBytes(32).toString('base64url');
  const expiresAt = options.ttlMs ? nowIso(new Date(Date.now() + options.ttlMs)) : null;
  await store.writeTransaction(async (trx) => {
    await trx.insertInto('api_tokens').values({
      id, name: options.name ?? '', scopes: options.scopes.join(' '), secret_hash: hashSecret(secret), created_by: options.actor,
      created_at: nowIso(), expires_at: expiresAt, revoked_at: null, last_used_at: null,
    }).execute();
    await appendAudit(trx, [{ actor: options.actor, action: 'token.create', target: id, details: { scopes: options.scopes, expiresAt, name: options.name ?? '' } }]);
  });
  return { id, token: `hm_${id}_${secret}`, scopes: options.scopes, expiresAt };
}

export async function revokeToken(store: Store, id: string, actor: string): Promise<void> {
  await store.writeTransaction(async (trx) => {
    const r = await trx.updateTable('api_tokens').set({ revoked_at: nowIso() }).where('id', '=', id).where('revoked_at', 'is', null).executeTakeFirst();
    if (Number(r.numUpdatedRows) === 0) throw new HallmarkError('NOT_FOUND', `no active token ${id}`);
    await appendAudit(trx, [{ actor, action: 'token.revoke', target: id }]);
  });
}

export async function listTokens(store: Store): Promise<{ id: string; name: string; scopes: string[]; createdAt: string; expiresAt: string | null; revokedAt: string | null; lastUsedAt: string | null }[]> {
  const rows = await store.db.selectFrom('api_tokens').selectAll().orderBy('created_at').execute();
  return rows.map((r) => ({ id: r.id, name: r.name, scopes: r.scopes.split(' '), createdAt: r.created_at, expiresAt: r.expires_at, revokedAt: r.revoked_at, lastUsedAt: r.last_used_at }));
}

export interface Principal { readonly tokenId: string; readonly scopes: readonly Scope[] }

/**
 * Checks a bearer token. Failures are audited (with the token id when it parses, never the secret)
 * and throw UNAUTHENTICATED with one reason for all cases, so a caller learns nothing about which part was wrong.
 */
export async function authenticateToken(store: Store, presented: string | undefined, source: string): Promise<Principal> {
  const m = presented ? /^hm_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$/.exec(presented) : null;
  const fail = async (why: string, id?: string): Promise<never> => {
    await store.writeTransaction((trx) => appendAudit(trx, [{ actor: source, action: 'auth.failed', target: id ?? '-', details: { reason: why } }]));
    throw new HallmarkError('UNAUTHENTICATED', 'missing, invalid, expired or revoked bearer token');
  };
  if (!presented) throw new HallmarkError('UNAUTHENTICATED', 'a bearer token is required (Authorization: Bearer hm_…)');
  if (!m) return fail('malformed token');
  const [, id, secret] = m as unknown as [string, string, string];
  const row = await store.db.selectFrom('api_tokens').selectAll().where('id', '=', id).executeTakeFirst();
  if (!row) return fail('unknown token id', id);
  const a = Buffer.from(row.secret_hash, 'hex');
  const b = Buffer.from(hashSecret(secret), 'hex');
  if (a.length !== b.length || !timingSafeEqual(a, b)) return fail('wrong secret', id);
  if (row.revoked_at) return fail('revoked', id);
  if (row.expires_at && new Date(row.expires_at) <= new Date()) return fail('expired', id);
  // last_used_at is a convenience for operators; not audited per use (would flood the log).
  await store.db.updateTable('api_tokens').set({ last_used_at: nowIso() }).where('id', '=', id).execute();
  return { tokenId: id, scopes: row.scopes.split(' ') as Scope[] };
}

export function requireScope(principal: Principal, scope: Scope): void {
  if (!principal.scopes.includes('admin') && !principal.scopes.includes(scope)) {
    throw new HallmarkError('FORBIDDEN', `this token lacks the ${scope} scope`);
  }
}
