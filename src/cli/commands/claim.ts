import { parseDuration } from '../../authority/tokens.js';
import { DEFAULT_CLAIM_PER_MINUTE, createClaim, listClaims, revokeClaim } from '../../enrollment/claims.js';
import { HallmarkError } from '../../errors.js';
import { withStoreOnly } from '../context.js';
import { actor, flag, info, intOption, out, required, str, table, type Command } from '../io.js';

export const claimCreateCommand: Command = {
  name: 'claim create',
  summary: 'create an enrolment claim: lets up to N devices of a batch enrol once each (shown once)',
  usage: `Usage: hallmark claim create --batch ID --uses N --ttl DURATION [--per-minute N] [--json] [--home DIR]

Prints the claim as HTTP Basic credentials ID:SECRET on stdout (once; only a hash is stored). A device
presents them to EST simpleenroll (curl --user ID:SECRET). Each device of the batch may enrol with the
claim once; the key in its CSR must be registered in the batch, unless the batch was created with
--allow-unregistered (the key is then registered on first use). The batch quota still applies.
--per-minute caps the claim's request rate (default ${DEFAULT_CLAIM_PER_MINUTE}). DURATION: 30m, 24h, 7d.`,
  options: { batch: { type: 'string' }, uses: { type: 'string' }, ttl: { type: 'string' }, 'per-minute': { type: 'string' }, json: { type: 'boolean' } },
  async run(args) {
    const batch = required(args, 'batch', this.usage);
    const uses = intOption(args, 'uses');
    if (uses === undefined) throw new HallmarkError('BAD_REQUEST', `--uses is required\n${this.usage}`);
    const ttlMs = parseDuration(required(args, 'ttl', this.usage));
    const perMinute = intOption(args, 'per-minute');
    return withStoreOnly(args, async (ctx) => {
      const claim = await createClaim(ctx.store, { batch, uses, ttlMs, perMinute, actor: actor() });
      if (flag(args, 'json')) out(JSON.stringify(claim, null, 2));
      else out(claim.basic);
      info(`Claim ${claim.id} for batch ${claim.batch}: ${claim.maxUses} device(s), expires ${claim.expiresAt}. The secret is not shown again.`);
      return 0;
    });
  },
};

export const claimListCommand: Command = {
  name: 'claim list',
  summary: 'list enrolment claims and their use (never their secrets)',
  usage: 'Usage: hallmark claim list [--batch ID] [--json] [--home DIR]',
  options: { batch: { type: 'string' }, json: { type: 'boolean' } },
  async run(args) {
    return withStoreOnly(args, async (ctx) => {
      const claims = await listClaims(ctx.store, { batch: str(args, 'batch') });
      if (flag(args, 'json')) out(JSON.stringify(claims, null, 2));
      else out(table(['ID', 'BATCH', 'STATUS', 'USED', 'PER MINUTE', 'EXPIRES', 'LAST USED'], claims.map((c) => [c.id, c.batch, c.status, `${c.used}/${c.maxUses}`, String(c.perMinute), c.expiresAt, c.lastUsedAt ?? '-'])));
      return 0;
    });
  },
};

export const claimRevokeCommand: Command = {
  name: 'claim revoke',
  summary: 'revoke an enrolment claim',
  usage: 'Usage: hallmark claim revoke ID [--home DIR]',
  allowPositionals: true,
  options: {},
  async run(args) {
    const id = args.positionals[0];
    if (!id || args.positionals.length > 1) throw new HallmarkError('BAD_REQUEST', `give one claim id\n${this.usage}`);
    return withStoreOnly(args, async (ctx) => {
      await revokeClaim(ctx.store, id, actor());
      out(`Revoked claim ${id}`);
      return 0;
    });
  },
};
