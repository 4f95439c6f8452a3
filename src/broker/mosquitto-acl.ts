// The Mosquitto `acl_file` for Hallmark devices, made from the registry: each device gets the MQTT
// permissions of its product's policy (products.policy, src/connect/policy.ts; the default policy when
// null), and a suspended, revoked or decommissioned device gets none.
//
// Mosquitto 2.0's acl_file has `user NAME` blocks with `topic [read|write|readwrite|deny] FILTER` lines
// and `pattern` lines (with %u, the username) that apply to every user. Two facts about it (checked
// against 2.0.11 by test/interop/mosquitto*.test.ts) shape the file:
//   - a `deny` line in a user's block wins over every allow, the user's own and the patterns', whatever
//     the order; so a device cannot be given "the patterns minus something, plus something else";
//   - the file is only read at start and on SIGHUP, when Mosquitto re-applies it to open connections too.
// Hence two layouts:
//   uniform     every product has the same policy (the usual case: all on the default). That policy as
//               `pattern` lines ({udid} → %u), plus `user UDID` / `topic deny #` for every suspended
//               device and every revoked or decommissioned device holding a certificate not yet expired.
//               A newly registered device needs no change of the file.
//   per-device  products differ (or the strict layout was chosen: `hallmark broker mosquitto --acl
//               per-device`): one `user UDID` block per device that may connect (registered, provisioned,
//               active) with its product's filters, {udid} filled in; no patterns, so a certificate whose
//               CN is no such device may do nothing. A device registered since the file was written may
//               do nothing until the next sync (fail-safe: refused, never over-granted).
// In the uniform layout a certificate of a Hallmark CA whose CN is not a registry device (one made with
// `hallmark issue --profile device` without --device) gets the policy's patterns too; the strict
// layout refuses it everything, at the price of a file that grows with the fleet.
// `read` governs delivery: Mosquitto's acl_file does not check SUBSCRIBE itself (the SUBACK grants any
// filter) but delivers only messages whose topic the subscriber may read.

import { parsePolicy, type ProductPolicy } from '../connect/policy.js';
import type { Store } from '../store/database.js';
import type { DeviceState } from '../store/schema.js';

export type AclLayout = 'uniform' | 'per-device';
/** What the operator chose: 'auto' (uniform when every product has the same policy) or always 'per-device'. */
export type AclChoice = 'auto' | 'per-device';

export interface AclFile {
  readonly text: string;
  readonly layout: AclLayout;
  /** Devices given permissions by a `user` block (per-device) or denied by one (uniform). */
  readonly devices: number;
  /** Devices blocked (deny # in uniform; left out in per-device): suspended, revoked, decommissioned. */
  readonly blocked: number;
  /** Products whose stored policy is invalid (their devices get nothing), filters left out, etc. */
  readonly warnings: readonly string[];
}

/** Device states that may connect (as in src/connect/decision.ts). */
export const CONNECTABLE_STATES: readonly DeviceState[] = ['registered', 'provisioned', 'active'];
const BLOCKED_STATES: readonly DeviceState[] = ['suspended', 'revoked', 'decommissioned'];

/**
 * Why a topic filter cannot be written into an acl_file line, or undefined when it can. The file is
 * line-based and Mosquitto trims white space around the filter: control characters (a newline would
 * start a line of one's own choosing) and leading / trailing white space are refused.
 */
export function aclUnsafe(filter: string): string | undefined {
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/.test(filter)) return 'contains a control character (line break, tab, ...)';
  if (filter !== filter.trim()) return 'has leading or trailing white space';
  return undefined;
}

/** A username Mosquitto can name in a `user` line (the UDID, hex; anything else is left out). */
const SAFE_USERNAME = /^[\x21-\x7e]{1,256}$/;

interface ProductRow { id: number; name: string; policy: string | null }

function policiesOf(products: readonly ProductRow[], warnings: string[]): Map<number, ProductPolicy | undefined> {
  const out = new Map<number, ProductPolicy | undefined>();
  for (const p of products) {
    try {
      const policy = parsePolicy(p.policy);
      const unsafe = [...policy.mqtt.publish, ...policy.mqtt.subscribe].map((f) => [f, aclUnsafe(f)] as const).find(([, why]) => why);
      if (unsafe) {
        warnings.push(`product ${p.name}: topic filter ${JSON.stringify(unsafe[0])} ${unsafe[1]}; its devices get no permissions`);
        out.set(p.id, undefined);
      } else out.set(p.id, policy);
    } catch (err) {
      warnings.push(`product ${p.name}: invalid policy (${(err as Error).message}); its devices get no permissions`);
      out.set(p.id, undefined);
    }
  }
  return out;
}

const canonical = (p: ProductPolicy): string => JSON.stringify({ publish: p.mqtt.publish, subscribe: p.mqtt.subscribe });

/** Builds the acl_file from the registry (see the header comment). */
export async function buildAcl(store: Store, options: { layout?: AclChoice; now?: Date } = {}): Promise<AclFile> {
  const now = options.now ?? new Date();
  const warnings: string[] = [];
  const products = await store.db.selectFrom('products').select(['id', 'name', 'policy']).orderBy('id').execute();
  const policies = policiesOf(products, warnings);
  const distinct = new Set([...policies.values()].map((p) => (p ? canonical(p) : 'invalid')));
  const only = [...policies.values()][0];
  // One valid policy for all (or no product yet: the default). A '%' would be expanded in a pattern line.
  const shared = products.length === 0 ? parsePolicy(null) : distinct.size === 1 && only ? only : undefined;
  const uniform = options.layout !== 'per-device' && shared !== undefined && ![...shared.mqtt.publish, ...shared.mqtt.subscribe].some((f) => f.includes('%'));

  const header = `# Written by Hallmark from its registry (hallmark broker mosquitto; kept in step by hallmark serve --broker-dir).
# Do not edit: it is rewritten on every registry change. The MQTT username is the client certificate's CN, the device UDID.
`;
  if (uniform) {
    // Blocked devices that could still present a certificate the broker accepts.
    const blocked = await store.db.selectFrom('devices').select('udid')
      .where((eb) => eb.or([
        eb('state', '=', 'suspended'),
        eb.and([eb('state', 'in', ['revoked', 'decommissioned']), eb.exists(eb.selectFrom('certificates').select('certificates.id')
          .whereRef('certificates.device_udid', '=', 'devices.udid').where('certificates.not_after', '>', now.toISOString()))]),
      ]))
      .orderBy('udid').execute();
    const lines: string[] = [header, `# Layout: uniform (every product has this policy). Blocked devices (suspended, revoked, decommissioned): ${blocked.length}.`];
    for (const { udid } of blocked) {
      if (!SAFE_USERNAME.test(udid)) { warnings.push(`device ${JSON.stringify(udid)}: not a name an acl_file can hold; left out`); continue; }
      lines.push(`user ${udid}`, 'topic deny #');
    }
    lines.push('', '# The policy, for every other certificate of a Hallmark CA (%u: the UDID).');
    for (const f of shared.mqtt.publish) lines.push(`pattern write ${f.replaceAll('{udid}', '%u')}`);
    for (const f of shared.mqtt.subscribe) lines.push(`pattern read ${f.replaceAll('{udid}', '%u')}`);
    return { text: lines.join('\n') + '\n', layout: 'uniform', devices: blocked.length, blocked: blocked.length, warnings };
  }

  const rows = await store.db.selectFrom('devices').select(['udid', 'product_id']).where('state', 'in', [...CONNECTABLE_STATES]).orderBy('udid').execute();
  const blockedCount = await store.db.selectFrom('devices').select((eb) => eb.fn.countAll<number>().as('n')).where('state', 'in', [...BLOCKED_STATES]).executeTakeFirst();
  const why = options.layout === 'per-device' ? 'chosen with --acl per-device' : 'products have different policies';
  const lines: string[] = [header, `# Layout: per-device (${why}). A certificate whose CN is not named here may do nothing.`];
  let devices = 0;
  for (const { udid, product_id } of rows) {
    const policy = policies.get(product_id);
    if (!policy) continue;
    if (!SAFE_USERNAME.test(udid)) { warnings.push(`device ${JSON.stringify(udid)}: not a name an acl_file can hold; left out`); continue; }
    lines.push(`user ${udid}`);
    for (const f of policy.mqtt.publish) lines.push(`topic write ${f.replaceAll('{udid}', udid)}`);
    for (const f of policy.mqtt.subscribe) lines.push(`topic read ${f.replaceAll('{udid}', udid)}`);
    devices++;
  }
  return { text: lines.join('\n') + '\n', layout: 'per-device', devices, blocked: Number(blockedCount?.n ?? 0), warnings };
}
