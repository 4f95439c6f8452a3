// A product's connection policy (products.policy): what its devices may publish and subscribe to over
// MQTT, `{udid}` standing for the device's own UDID (src/connect/policy.ts). Setting it is audited as
// `product.policy`, which the connection checker's cache and the broker sync (hallmark serve
// --broker-dir) follow within a fraction of a second.

import { appendAudit } from '../audit/audit-log.js';
import { DEFAULT_POLICY, parsePolicy, validatePolicy, type ProductPolicy } from '../connect/policy.js';
import { HallmarkError } from '../errors.js';
import type { Store } from '../store/database.js';

export interface ProductPolicyInfo {
  readonly product: string;
  /** The policy in force (the default when none is stored). */
  readonly policy: ProductPolicy;
  /** Whether it is the default (no policy stored). */
  readonly isDefault: boolean;
}

/**
 * Checks a policy can be written into a broker's line-based ACL as it is: no control characters (a line
 * break would start a line of its own) and no white space around a filter (Mosquitto trims it).
 */
function checkBrokerSafe(policy: ProductPolicy): void {
  for (const [list, filters] of [['publish', policy.mqtt.publish], ['subscribe', policy.mqtt.subscribe]] as const) {
    filters.forEach((f, i) => {
      // eslint-disable-next-line no-control-regex
      if (/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/.test(f)) throw new HallmarkError('BAD_REQUEST', `policy.mqtt.${list}[${i}] contains a control character (line break, tab, ...)`);
      if (f !== f.trim()) throw new HallmarkError('BAD_REQUEST', `policy.mqtt.${list}[${i}] has leading or trailing white space`);
    });
  }
}

/** The policy of a product. */
export async function productPolicy(store: Store, product: string): Promise<ProductPolicyInfo> {
  const row = await store.db.selectFrom('products').select(['name', 'policy']).where('name', '=', product).executeTakeFirst();
  if (!row) throw new HallmarkError('PRODUCT_NOT_FOUND', `no product named ${product}`);
  return { product: row.name, policy: parsePolicy(row.policy), isDefault: row.policy === null || row.policy.trim() === '' };
}

/**
 * Sets (policy: JSON text or object) or clears (policy: null: back to the default) a product's policy.
 * Validated first (src/connect/policy.ts, plus the broker-safety check above); stored as compact JSON.
 */
export async function setProductPolicy(store: Store, options: { product: string; policy: string | object | null; actor: string }): Promise<ProductPolicyInfo> {
  let policy: ProductPolicy | null = null;
  if (options.policy !== null) {
    policy = typeof options.policy === 'string' ? parsePolicy(options.policy) : validatePolicy(options.policy);
    if (typeof options.policy === 'string' && options.policy.trim() === '') policy = null;
  }
  if (policy) checkBrokerSafe(policy);
  const stored = policy ? JSON.stringify({ mqtt: { publish: policy.mqtt.publish, subscribe: policy.mqtt.subscribe } }) : null;
  await store.writeTransaction(async (trx) => {
    const row = await trx.selectFrom('products').select(['id', 'policy']).where('name', '=', options.product).executeTakeFirst();
    if (!row) throw new HallmarkError('PRODUCT_NOT_FOUND', `no product named ${options.product}`);
    await trx.updateTable('products').set({ policy: stored }).where('id', '=', row.id).execute();
    await appendAudit(trx, [{
      actor: options.actor, action: 'product.policy', target: options.product,
      details: { policy: policy ? JSON.parse(stored!) as unknown : null, previous: asJson(row.policy) },
    }]);
  });
  return { product: options.product, policy: policy ?? DEFAULT_POLICY, isDefault: policy === null };
}

function asJson(text: string | null): unknown {
  if (text === null) return null;
  try { return JSON.parse(text); } catch { return text; }
}
