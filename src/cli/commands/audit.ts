import { listAudit, verifyAuditLog } from '../../audit/audit-log.js';
import { withStoreOnly } from '../context.js';
import { flag, intOption, out, str, type Command } from '../io.js';

export const auditVerifyCommand: Command = {
  name: 'audit verify',
  summary: 'walk the audit log hash chain; report the first changed, removed or reordered entry',
  usage: 'Usage: hallmark audit verify [--home DIR] [--json]\n\nExit status 0 when the chain verifies, 3 when it does not.',
  options: { json: { type: 'boolean' } },
  async run(args) {
    return withStoreOnly(args, async (ctx) => {
      const verdict = await verifyAuditLog(ctx.store.db);
      if (flag(args, 'json')) out(JSON.stringify(verdict));
      else if (verdict.ok) out(`ok, ${verdict.entries} entries`);
      else out(`FAILED at entry ${verdict.seq}: ${verdict.reason} (${verdict.entries} entries before it verify)`);
      return verdict.ok ? 0 : 3;
    });
  },
};

export const auditListCommand: Command = {
  name: 'audit list',
  summary: 'print audit entries',
  usage: 'Usage: hallmark audit list [--home DIR] [--after SEQ] [--limit N] [--action ACTION] [--json]',
  options: { after: { type: 'string' }, limit: { type: 'string' }, action: { type: 'string' }, json: { type: 'boolean' } },
  async run(args) {
    return withStoreOnly(args, async (ctx) => {
      const entries = await listAudit(ctx.store.db, { after: intOption(args, 'after'), limit: intOption(args, 'limit') ?? 100, action: str(args, 'action') });
      for (const e of entries) out(flag(args, 'json') ? JSON.stringify(e) : `${e.seq}\t${e.at}\t${e.actor}\t${e.action}\t${e.target}\t${JSON.stringify(e.details)}`);
      return 0;
    });
  },
};
