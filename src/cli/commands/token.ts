import { SCOPES, createToken, listTokens, parseDuration, parseScopes, revokeToken } from '../../authority/tokens.js';
import { withStoreOnly } from '../context.js';
import { actor, flag, info, out, required, str, table, type Command } from '../io.js';

export const tokenCreateCommand: Command = {
  name: 'token create',
  summary: 'create an admin API token (shown once, stored only as a hash)',
  usage: `Usage: hallmark token create --scope SCOPE[,SCOPE...] [--ttl DURATION] [--name TEXT] [--home DIR]

Scopes: ${Object.entries(SCOPES).map(([k, v]) => `${k} (${v})`).join(', ')}.
DURATION: 30m, 12h, 90d, 1y. The token is printed once on stdout; only its hash is stored.`,
  options: { scope: { type: 'string', multiple: true }, ttl: { type: 'string' }, name: { type: 'string' } },
  async run(args) {
    const scopes = parseScopes(((args.values.scope as string[] | undefined) ?? []).join(','));
    const ttl = str(args, 'ttl');
    const ttlMs = ttl ? parseDuration(ttl) : undefined;
    return withStoreOnly(args, async (ctx) => {
      const t = await createToken(ctx.store, { scopes, ttlMs, name: str(args, 'name'), actor: actor() });
      out(t.token);
      info(`Token ${t.id} with scopes ${t.scopes.join(', ')}${t.expiresAt ? `, expires ${t.expiresAt}` : ', no expiry'}. It is not shown again.`);
      return 0;
    });
  },
};

export const tokenListCommand: Command = {
  name: 'token list',
  summary: 'list API tokens (never their secrets)',
  usage: 'Usage: hallmark token list [--home DIR] [--json]',
  options: { json: { type: 'boolean' } },
  async run(args) {
    return withStoreOnly(args, async (ctx) => {
      const tokens = await listTokens(ctx.store);
      if (flag(args, 'json')) out(JSON.stringify(tokens, null, 2));
      else out(table(['ID', 'NAME', 'SCOPES', 'CREATED', 'EXPIRES', 'REVOKED', 'LAST USED'], tokens.map((t) => [t.id, t.name, t.scopes.join(','), t.createdAt, t.expiresAt ?? '-', t.revokedAt ?? '-', t.lastUsedAt ?? '-'])));
      return 0;
    });
  },
};

export const tokenRevokeCommand: Command = {
  name: 'token revoke',
  summary: 'revoke an API token',
  usage: 'Usage: hallmark token revoke --id ID [--home DIR]',
  options: { id: { type: 'string' } },
  async run(args) {
    const id = required(args, 'id', this.usage);
    return withStoreOnly(args, async (ctx) => {
      await revokeToken(ctx.store, id, actor());
      out(`Revoked token ${id}`);
      return 0;
    });
  },
};
