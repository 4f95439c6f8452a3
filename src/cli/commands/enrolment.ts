import { decideApproval, listApprovals } from '../../enrollment/approvals.js';
import { HallmarkError } from '../../errors.js';
import { withStoreOnly } from '../context.js';
import { actor, flag, out, str, table, type Command } from '../io.js';

const STATUSES = ['pending', 'approved', 'rejected', 'used'] as const;

export const enrolmentListCommand: Command = {
  name: 'enrolment list',
  summary: 'list enrolment requests of batches that require approval',
  usage: 'Usage: hallmark enrolment list [--status pending|approved|rejected|used] [--batch ID] [--json] [--home DIR]',
  options: { status: { type: 'string' }, batch: { type: 'string' }, json: { type: 'boolean' } },
  async run(args) {
    const status = str(args, 'status');
    if (status !== undefined && !(STATUSES as readonly string[]).includes(status)) throw new HallmarkError('BAD_REQUEST', `--status is one of ${STATUSES.join(', ')}`);
    return withStoreOnly(args, async (ctx) => {
      const items = await listApprovals(ctx.store, { status: status as (typeof STATUSES)[number] | undefined, batch: str(args, 'batch') });
      if (flag(args, 'json')) out(JSON.stringify(items, null, 2));
      else out(table(['ID', 'STATUS', 'BATCH', 'DEVICE', 'AUTHENTICATOR', 'FROM', 'REQUESTED', 'DECIDED BY'], items.map((a) => [a.id, a.status, a.batch, a.udid, a.authenticator, a.source, a.requestedAt, a.decidedBy ?? '-'])));
      return 0;
    });
  },
};

function decisionCommand(decision: 'approve' | 'reject'): Command {
  return {
    name: `enrolment ${decision}`,
    summary: decision === 'approve' ? 'approve a pending enrolment request (the device gets its certificate at its next try)' : 'reject a pending enrolment request',
    usage: `Usage: hallmark enrolment ${decision} ID [--reason TEXT] [--home DIR]`,
    allowPositionals: true,
    options: { reason: { type: 'string' } },
    async run(args) {
      const id = args.positionals[0];
      if (!id || args.positionals.length > 1) throw new HallmarkError('BAD_REQUEST', `give one enrolment request id\n${this.usage}`);
      return withStoreOnly(args, async (ctx) => {
        const a = await decideApproval(ctx.store, id, decision, actor(), str(args, 'reason'));
        out(`${decision === 'approve' ? 'Approved' : 'Rejected'} enrolment request ${a.id} of device ${a.udid} (batch ${a.batch})`);
        return 0;
      });
    },
  };
}

export const enrolmentApproveCommand = decisionCommand('approve');
export const enrolmentRejectCommand = decisionCommand('reject');
