// Moving production: a line's batches (with their devices) go to another line, e.g. after the first
// line's CA was compromised and revoked. Devices keep their hardware identity, UDID, batch and quota
// counts; their next enrolment is issued by the new line's CA.

import { appendAudit } from '../audit/audit-log.js';
import { HallmarkError } from '../errors.js';
import { nowIso, type Store } from '../store/database.js';

export interface LineMove {
  readonly batches: readonly string[];
  readonly devices: number;
}

/** Moves every batch of line `from` (or only `batch`) to line `to`. Audited; all or nothing. */
export async function moveToLine(store: Store, options: { from: string; to: string; batch?: string; actor: string }): Promise<LineMove> {
  if (options.from === options.to) throw new HallmarkError('BAD_REQUEST', 'the lines are the same');
  return store.writeTransaction(async (trx) => {
    const from = await trx.selectFrom('lines').select('id').where('name', '=', options.from).executeTakeFirst();
    if (!from) throw new HallmarkError('LINE_NOT_FOUND', `no line named ${options.from}`);
    const to = await trx.selectFrom('lines').innerJoin('certificate_authorities as ca', 'ca.id', 'lines.ca_id').select(['lines.id', 'ca.name as ca', 'ca.status']).where('lines.name', '=', options.to).executeTakeFirst();
    if (!to) throw new HallmarkError('LINE_NOT_FOUND', `no line named ${options.to}`);
    if (to.status !== 'active') throw new HallmarkError('CA_NOT_ACTIVE', `line ${options.to} issues under CA ${to.ca}, which is ${to.status}`);
    let q = trx.selectFrom('batches').select('id').where('line_id', '=', from.id);
    if (options.batch) q = q.where('id', '=', options.batch);
    const batches = (await q.orderBy('id').execute()).map((b) => b.id);
    if (options.batch && batches.length === 0) throw new HallmarkError('BATCH_NOT_FOUND', `no batch ${options.batch} on line ${options.from}`);
    let devices = 0;
    const now = nowIso();
    for (const id of batches) {
      await trx.updateTable('batches').set({ line_id: to.id }).where('id', '=', id).execute();
      const r = await trx.updateTable('devices').set({ line_id: to.id, updated_at: now }).where('batch_id', '=', id).executeTakeFirst();
      devices += Number(r.numUpdatedRows);
    }
    await appendAudit(trx, [{ actor: options.actor, action: 'line.move', target: options.from, details: { to: options.to, ca: to.ca, batches, devices } }]);
    return { batches, devices };
  });
}
