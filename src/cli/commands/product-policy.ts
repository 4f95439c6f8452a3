// hallmark product policy NAME [--file policy.json | --default]: show or set what a product's devices may
// publish and subscribe to over MQTT (src/connect/policy.ts, src/registry/product-policy.ts).

import { readFileSync } from 'node:fs';
import { POLICY_LIMITS } from '../../connect/policy.js';
import { HallmarkError } from '../../errors.js';
import { productPolicy, setProductPolicy, type ProductPolicyInfo } from '../../registry/product-policy.js';
import { withStoreOnly } from '../context.js';
import { actor, flag, out, str, type Command } from '../io.js';

function render(info: ProductPolicyInfo): string {
  const lines = [`product ${info.product}: ${info.isDefault ? 'the default policy' : 'its own policy'}`, '  publish:'];
  for (const f of info.policy.mqtt.publish) lines.push(`    ${f}`);
  if (info.policy.mqtt.publish.length === 0) lines.push('    (nothing)');
  lines.push('  subscribe:');
  for (const f of info.policy.mqtt.subscribe) lines.push(`    ${f}`);
  if (info.policy.mqtt.subscribe.length === 0) lines.push('    (nothing)');
  return lines.join('\n');
}

export const productPolicyCommand: Command = {
  name: 'product policy',
  summary: 'show or set what a product\'s devices may publish and subscribe to (MQTT topic filters)',
  usage: `Usage: hallmark product policy NAME [--file policy.json | --default] [--json] [--home DIR]

Without --file or --default: prints the product's policy. --file sets it from a JSON file:
  {"mqtt": {"publish": ["telemetry/{udid}", "devices/{udid}/#"], "subscribe": ["devices/{udid}/commands/#"]}}
MQTT topic filters ('+' one level, '#' the rest), {udid} standing for the device's own UDID; at most
${POLICY_LIMITS.filters} filters per list, ${POLICY_LIMITS.filterLength} characters each, ${POLICY_LIMITS.bytes} bytes in all. --default
goes back to the default policy (publish devices/{udid}/#, subscribe devices/{udid}/commands/#).
A running "hallmark serve --broker-dir DIR" gives the broker the new permissions within a second; the
connection checker (hallmark connect check, ConnectionChecker) answers with them at once.`,
  allowPositionals: true,
  options: { file: { type: 'string' }, default: { type: 'boolean' }, json: { type: 'boolean' } },
  async run(args) {
    const name = args.positionals[0];
    if (!name || args.positionals.length > 1) throw new HallmarkError('BAD_REQUEST', `give one product name\n${this.usage}`);
    const file = str(args, 'file');
    const reset = flag(args, 'default');
    if (file !== undefined && reset) throw new HallmarkError('BAD_REQUEST', 'give --file or --default, not both');
    let text: string | undefined;
    if (file !== undefined) {
      let data: Buffer;
      try { data = readFileSync(file); } catch (err) { throw new HallmarkError('BAD_REQUEST', `cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`); }
      if (data.length > POLICY_LIMITS.bytes) throw new HallmarkError('INPUT_TOO_LARGE', `${file} is over ${POLICY_LIMITS.bytes} bytes`);
      text = data.toString('utf8');
      if (text.trim() === '') throw new HallmarkError('BAD_REQUEST', `${file} is empty (use --default to go back to the default policy)`);
    }
    return withStoreOnly(args, async (ctx) => {
      const info = text !== undefined || reset
        ? await setProductPolicy(ctx.store, { product: name, policy: reset ? null : text!, actor: actor() })
        : await productPolicy(ctx.store, name);
      if (flag(args, 'json')) out(JSON.stringify({ product: info.product, default: info.isDefault, policy: info.policy }, null, 2));
      else out(render(info));
      return 0;
    });
  },
};
