// hallmark connect check: the connection decision for a client certificate, read from the store only.

import { readFileSync } from 'node:fs';
import { ConnectionChecker, type Decision } from '../../connect/decision.js';
import { HallmarkError } from '../../errors.js';
import { SIZE_LIMITS, decodePemBlocks } from '../../pki/pem.js';
import { withStoreOnly } from '../context.js';
import { flag, out, required, str, type Command } from '../io.js';

const USAGE = `Usage: hallmark connect check --cert FILE [--chain FILE] [--at ISO-TIME] [--json] [--home DIR]

The decision a service would make when a device presents this certificate: issued by a CA of this
authority, chaining to an active root, valid now (or at --at), on record and not revoked, identifying a
registry device that may connect (registered, provisioned or active). Prints the decision, its reason,
the device's tenant / product / line / batch and what it may publish and subscribe to (MQTT).

--cert is PEM (a leaf, or the leaf followed by its chain) or DER; --chain adds PEM certificates after it.
Needs no passphrase. Exit 0 when allowed, 1 when refused.`;

function readCertificates(file: string, what: string): Buffer[] {
  let data: Buffer;
  try { data = readFileSync(file); } catch (err) { throw new HallmarkError('BAD_REQUEST', `cannot read ${what} ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`); }
  if (data.length > SIZE_LIMITS.chain * 2) throw new HallmarkError('INPUT_TOO_LARGE', `${what} ${file} is over ${SIZE_LIMITS.chain * 2} bytes`);
  if (data[0] === 0x30) return [data];
  const blocks = decodePemBlocks(data.toString('utf8'), SIZE_LIMITS.certificate);
  const certs = blocks.filter((b) => b.label === 'CERTIFICATE' || b.label === 'X509 CERTIFICATE' || b.label === 'TRUSTED CERTIFICATE');
  if (certs.length === 0) throw new HallmarkError('BAD_PEM', `${what} ${file} holds no CERTIFICATE block`);
  return certs.map((b) => b.der);
}

export function renderDecision(d: Decision): string {
  const lines = [`${d.allowed ? 'ALLOWED' : 'REFUSED'} ${d.code}: ${d.reason}`];
  const field = (name: string, value: string | undefined) => { if (value !== undefined) lines.push(`  ${name.padEnd(10)} ${value}`); };
  field('udid', d.udid);
  field('tenant', d.tenant);
  field('product', d.product);
  field('line', d.line);
  field('batch', d.batch);
  field('serial', d.serial);
  field('issuer', d.issuer);
  if (d.permissions) {
    lines.push('  publish:');
    for (const f of d.permissions.publish) lines.push(`    ${f}`);
    if (d.permissions.publish.length === 0) lines.push('    (nothing)');
    lines.push('  subscribe:');
    for (const f of d.permissions.subscribe) lines.push(`    ${f}`);
    if (d.permissions.subscribe.length === 0) lines.push('    (nothing)');
  }
  return lines.join('\n');
}

export const connectCheckCommand: Command = {
  name: 'connect check',
  summary: 'would this client certificate be allowed to connect? (decision, reason, permissions)',
  usage: USAGE,
  options: { cert: { type: 'string' }, chain: { type: 'string' }, at: { type: 'string' }, json: { type: 'boolean' } },
  async run(args) {
    const chain = readCertificates(required(args, 'cert', USAGE), 'certificate file');
    const extra = str(args, 'chain');
    if (extra) chain.push(...readCertificates(extra, 'chain file'));
    const atText = str(args, 'at');
    const at = atText === undefined ? undefined : new Date(atText);
    if (at && Number.isNaN(at.getTime())) throw new HallmarkError('BAD_REQUEST', `--at is not a time: ${JSON.stringify(atText)} (ISO 8601, e.g. 2030-01-01T00:00:00Z)`);
    return withStoreOnly(args, async (ctx) => {
      const checker = new ConnectionChecker({ store: ctx.store });
      try {
        const decision = await checker.check(chain, at);
        out(flag(args, 'json') ? JSON.stringify(decision, null, 2) : renderDecision(decision));
        return decision.allowed ? 0 : 1;
      } finally {
        await checker.close();
      }
    });
  },
};
