// Registry.registerDevices at its edges, on both dialects: duplicates inside one call, a UDID or a key
// held by another device, re-imports, re-registration after decommissioning, an empty list, the batch
// quota; and a differential test against a small reference model of the rules (docs/registry.md).

import assert from 'node:assert/strict';
import { createHash, generateKeyPairSync } from 'node:crypto';
import type { TestContext } from 'node:test';
import { verifyAuditLog } from '../../src/audit/audit-log.js';
import { HallmarkError, type ErrorCode } from '../../src/errors.js';
import { Registry, type DeviceRegistration, type RegistrationOutcome } from '../../src/registry/registry.js';
import { nowIso, type Store } from '../../src/store/database.js';
import { forEachDialect, type StoreTarget } from '../helpers/db.js';

const ACTOR = 'test:register-devices';

const hasCode = (code: ErrorCode, message?: RegExp) => (err: unknown): boolean => {
  assert.ok(err instanceof HallmarkError, `expected a HallmarkError, got ${String(err)}`);
  assert.equal(err.code, code, err.message);
  if (message) assert.match(err.message, message);
  return true;
};

interface Key { spki: Buffer; hash: string }
const newKey = (): Key => {
  const spki = generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ type: 'spki', format: 'der' });
  return { spki, hash: createHash('sha256').update(spki).digest('hex') };
};

interface DeviceState { udid: string; keyHash: string; batch: string; state: string; serial: string | null; tenant: string }

async function devices(store: Store): Promise<DeviceState[]> {
  const rows = await store.db.selectFrom('devices').select(['udid', 'public_key_sha256', 'batch_id', 'state', 'serial_number', 'tenant']).orderBy('udid').execute();
  return rows.map((r) => ({ udid: r.udid, keyHash: r.public_key_sha256, batch: r.batch_id, state: r.state, serial: r.serial_number, tenant: r.tenant }));
}

async function auditCount(store: Store, action?: string): Promise<number> {
  let q = store.db.selectFrom('audit_log').select((eb) => eb.fn.countAll().as('n'));
  if (action) q = q.where('action', '=', action);
  return Number((await q.executeTakeFirstOrThrow()).n);
}

/** A store with a CA row, a product, a line and `batches` batches; no authority needed to register devices. */
async function setUp(store: Store, quotas: number[]): Promise<{ registry: Registry; batches: string[] }> {
  const now = nowIso();
  await store.db.insertInto('certificate_authorities').values({ name: 'test-ca', role: 'intermediate', parent_id: null, status: 'active', subject: 'CN=test', key_ref: null, key_algorithm: 'ecdsa-p256', ski: '00', path_len: 0, certificate_der: null, csr_der: null, serial: null, not_before: null, not_after: null, created_at: now, updated_at: now }).execute();
  const registry = new Registry(store);
  await registry.createProduct({ name: 'sensor', actor: ACTOR });
  await registry.createLine({ name: 'line-1', ca: 'test-ca', actor: ACTOR });
  const batches: string[] = [];
  for (const quota of quotas) batches.push(await registry.createBatch({ product: 'sensor', line: 'line-1', quota, actor: ACTOR }));
  return { registry, batches };
}

forEachDialect('registerDevices edge cases', async (t: TestContext, target: StoreTarget) => {
  const store = await target.openStore();
  const { registry, batches: [b1, b2, small] } = await setUp(store, [100, 100, 2]);

  await t.test('an empty list registers nothing, writes nothing, and still needs an existing batch', async () => {
    const audit = await auditCount(store);
    assert.deepEqual(await registry.registerDevices(b1!, [], ACTOR), []);
    assert.equal(await auditCount(store), audit);
    assert.deepEqual(await devices(store), []);
    await assert.rejects(registry.registerDevices('b-000000000000', [], ACTOR), hasCode('BATCH_NOT_FOUND'));
  });

  await t.test('the same key twice in one call refuses the call; nothing stored, nothing audited', async () => {
    const k = newKey();
    const audit = await auditCount(store);
    await assert.rejects(registry.registerDevices(b1!, [{ publicKeySpki: newKey().spki }, { publicKeySpki: k.spki }, { publicKeySpki: k.spki, udid: '0a0b0c' }], ACTOR),
      hasCode('CLONE_DETECTED', /^entry 3 \(UDID 0a0b0c\): the same public key as entry 2 of this input/));
    await assert.rejects(registry.registerDevices(b1!, [{ publicKeySpki: k.spki }, { publicKeySpki: k.spki }], ACTOR), hasCode('CLONE_DETECTED', /entry 2.*the same UDID as entry 1/));
    assert.equal(await auditCount(store), audit);
    assert.deepEqual(await devices(store), []);
  });

  await t.test('the same explicit UDID with two keys in one call refuses the call', async () => {
    await assert.rejects(registry.registerDevices(b1!, [{ publicKeySpki: newKey().spki, udid: 'AA:BB:CC' }, { publicKeySpki: newKey().spki, udid: 'aabbcc' }], ACTOR),
      hasCode('CLONE_DETECTED', /^entry 2 \(UDID aabbcc\): the same UDID as entry 1/));
    assert.deepEqual(await devices(store), []);
  });

  await t.test('a malformed entry anywhere is reported before a duplicate earlier in the list', async () => {
    const k = newKey();
    await assert.rejects(registry.registerDevices(b1!, [{ publicKeySpki: k.spki }, { publicKeySpki: k.spki }, { publicKeySpki: newKey().spki, serialNumber: 'bad\nserial' }], ACTOR),
      hasCode('BAD_REQUEST', /^entry 3: the serial number/));
    await assert.rejects(registry.registerDevices(b1!, [{ publicKeySpki: newKey().spki }, { publicKeySpki: Buffer.from('not a key') }], ACTOR), hasCode('UNSUPPORTED_ALGORITHM', /^entry 2/));
    assert.deepEqual(await devices(store), []);
  });

  const held = newKey();
  const heldUdid = 'f00d01';
  await t.test('registered devices do not take batch quota: five devices in a batch of quota 2', async () => {
    const list = Array.from({ length: 5 }, () => ({ publicKeySpki: newKey().spki }));
    assert.deepEqual(await registry.registerDevices(small!, list, ACTOR), Array(5).fill('registered'));
    const batch = await registry.batch(small!);
    assert.deepEqual([batch.quota, batch.issued, batch.refused, batch.registered], [2, 0, 0, 5]);
    assert.equal(await auditCount(store, 'device.register'), 5);
  });

  await t.test('a UDID held by a device with another key is a clone: the whole call refused, audited with both batches', async () => {
    await registry.registerDevices(b1!, [{ publicKeySpki: held.spki, udid: heldUdid, serialNumber: 'SN-1' }], ACTOR);
    const before = await devices(store);
    const audit = await auditCount(store);
    const fresh = newKey();
    await assert.rejects(registry.registerDevices(b2!, [{ publicKeySpki: fresh.spki }, { publicKeySpki: newKey().spki, udid: heldUdid }], ACTOR),
      hasCode('CLONE_DETECTED', new RegExp(`^entry 2 \\(UDID ${heldUdid}\\): UDID is registered with a different key \\(batch ${b1}\\)`)));
    assert.deepEqual(await devices(store), before, 'nothing of the call is stored, not even the valid first entry');
    assert.equal(await auditCount(store), audit + 1);
    const [refusal] = await store.db.selectFrom('audit_log').select(['target', 'details']).where('action', '=', 'device.clone_refused').orderBy('seq', 'desc').limit(1).execute();
    assert.equal(refusal!.target, heldUdid);
    assert.deepEqual(JSON.parse(refusal!.details), { batch: b2, existingBatch: b1, existingUdid: heldUdid, reason: 'UDID is registered with a different key', source: 'device.register' });
  });

  await t.test('a key held under another UDID is a clone, in the same batch as well', async () => {
    const before = await devices(store);
    await assert.rejects(registry.registerDevices(b1!, [{ publicKeySpki: held.spki }], ACTOR), hasCode('CLONE_DETECTED', /public key is registered under another UDID/));
    await assert.rejects(registry.registerDevices(b2!, [{ publicKeySpki: held.spki, udid: 'beef02' }], ACTOR), hasCode('CLONE_DETECTED', /public key is registered under another UDID/));
    await assert.rejects(registry.registerDevices(b2!, [{ publicKeySpki: held.spki, udid: heldUdid }], ACTOR), hasCode('CLONE_DETECTED', /device is registered in another batch/));
    assert.deepEqual(await devices(store), before);
  });

  await t.test('re-importing the same list changes nothing: no row, no audit entry, not even updated_at', async () => {
    const list: DeviceRegistration[] = [{ publicKeySpki: held.spki, udid: heldUdid, serialNumber: 'SN-1' }, ...Array.from({ length: 3 }, (_, i) => ({ publicKeySpki: newKey().spki, serialNumber: `SN-${i + 2}`, tenant: 'acme' }))];
    assert.deepEqual(await registry.registerDevices(b1!, list, ACTOR), ['unchanged', 'registered', 'registered', 'registered']);
    const rows = await store.db.selectFrom('devices').selectAll().orderBy('udid').execute();
    const audit = await auditCount(store);
    assert.deepEqual(await registry.registerDevices(b1!, list, ACTOR), Array(4).fill('unchanged'));
    assert.deepEqual(await registry.registerDevices(b1!, [list[2]!, list[0]!], ACTOR), ['unchanged', 'unchanged']);
    assert.deepEqual(await store.db.selectFrom('devices').selectAll().orderBy('udid').execute(), rows);
    assert.equal(await auditCount(store), audit);
  });

  await t.test('a decommissioned device is registered anew: re-registered into the new batch, audited with the batch it left', async () => {
    const k = newKey();
    await registry.registerDevices(b1!, [{ publicKeySpki: k.spki, serialNumber: 'OLD-1' }], ACTOR);
    await registry.changeState(k.hash, 'decommission', ACTOR);
    const other = newKey();
    assert.deepEqual(await registry.registerDevices(b2!, [{ publicKeySpki: other.spki }, { publicKeySpki: k.spki, serialNumber: 'NEW-1', tenant: 'refurb' }], ACTOR), ['registered', 're-registered']);
    const d = await registry.device(k.hash);
    assert.deepEqual([d.state, d.batch, d.serialNumber, d.tenant, d.provisionedAt], ['registered', b2, 'NEW-1', 'refurb', null]);
    const [event] = await store.db.selectFrom('audit_log').select(['target', 'details']).where('action', '=', 'device.reregister').orderBy('seq', 'desc').limit(1).execute();
    assert.equal(event!.target, k.hash);
    assert.deepEqual(JSON.parse(event!.details), { batch: b2, previousBatch: b1 });
    // Once registered again it is an ordinary device: the same list again is unchanged.
    assert.deepEqual(await registry.registerDevices(b2!, [{ publicKeySpki: k.spki, serialNumber: 'NEW-1', tenant: 'refurb' }], ACTOR), ['unchanged']);
    // Decommissioned with a different UDID claimed for its key: still a clone.
    await registry.changeState(k.hash, 'decommission', ACTOR);
    await assert.rejects(registry.registerDevices(b1!, [{ publicKeySpki: k.spki, udid: 'c0ffee' }], ACTOR), hasCode('CLONE_DETECTED'));
    assert.equal((await registry.device(k.hash)).state, 'decommissioned');
  });

  await t.test('the audit chain verifies after all of this', async () => {
    const result = await verifyAuditLog(store.db);
    assert.equal(result.ok, true, JSON.stringify(result));
  });
});

/**
 * The rules as a reference model: registerDevices and this model are given the same random calls (lists
 * drawn from a small set of keys and UDIDs so that they collide often, and decommissions), and must agree
 * on every outcome, every refusal, and the stored devices after each step.
 */
class Model {
  readonly byUdid = new Map<string, { keyHash: string; batch: string; state: string }>();
  readonly udidOfKey = new Map<string, string>();

  register(batch: string, list: { udid: string; keyHash: string }[]): RegistrationOutcome[] | 'CLONE_DETECTED' {
    for (let j = 0; j < list.length; j++) {
      for (let i = 0; i < j; i++) if (list[i]!.udid === list[j]!.udid || list[i]!.keyHash === list[j]!.keyHash) return 'CLONE_DETECTED';
    }
    const outcomes: RegistrationOutcome[] = [];
    for (const { udid, keyHash } of list) {
      const byUdid = this.byUdid.get(udid);
      const keyUdid = this.udidOfKey.get(keyHash);
      const holder = byUdid ? { udid, ...byUdid } : keyUdid !== undefined ? { udid: keyUdid, ...this.byUdid.get(keyUdid)! } : undefined;
      if (!holder) { outcomes.push('registered'); continue; }
      const same = holder.udid === udid && holder.keyHash === keyHash;
      if (same && holder.batch === batch && holder.state !== 'decommissioned') outcomes.push('unchanged');
      else if (same && holder.state === 'decommissioned') outcomes.push('re-registered');
      else return 'CLONE_DETECTED';
    }
    list.forEach(({ udid, keyHash }, i) => {
      if (outcomes[i] === 'unchanged') return;
      this.byUdid.set(udid, { keyHash, batch, state: 'registered' });
      this.udidOfKey.set(keyHash, udid);
    });
    return outcomes;
  }
}

forEachDialect('registerDevices agrees with a reference model of the rules (random calls)', async (t: TestContext, target: StoreTarget) => {
  const store = await target.openStore();
  const { registry, batches } = await setUp(store, [1000, 1000, 1000]);
  const model = new Model();
  const keys = Array.from({ length: 12 }, newKey);
  const udids = ['0a01', '0a02', '0a03'];
  // A seeded generator, so that a failure can be replayed.
  let seed = 0x2545f491;
  const random = (n: number): number => { seed ^= seed << 13; seed ^= seed >>> 17; seed ^= seed << 5; return (seed >>> 0) % n; };
  const refused = { model: 0, registry: 0 };
  for (let step = 0; step < 60; step++) {
    if (random(5) === 0 && model.byUdid.size > 0) {
      const live = [...model.byUdid].filter(([, d]) => d.state !== 'decommissioned');
      if (live.length > 0) {
        const [udid, d] = live[random(live.length)]!;
        await registry.changeState(udid, 'decommission', ACTOR);
        d.state = 'decommissioned';
        continue;
      }
    }
    const batch = batches[random(batches.length)]!;
    const list = Array.from({ length: 1 + random(4) }, () => {
      const key = keys[random(keys.length)]!;
      const udid = random(4) === 0 ? udids[random(udids.length)]! : undefined;
      return { registration: { publicKeySpki: key.spki, udid } satisfies DeviceRegistration, udid: udid ?? key.hash, keyHash: key.hash };
    });
    const expected = model.register(batch, list);
    let actual: RegistrationOutcome[] | 'CLONE_DETECTED';
    try {
      actual = await registry.registerDevices(batch, list.map((e) => e.registration), ACTOR);
    } catch (err) {
      if (!(err instanceof HallmarkError) || err.code !== 'CLONE_DETECTED') throw err;
      actual = 'CLONE_DETECTED';
      refused.registry++;
    }
    if (expected === 'CLONE_DETECTED') refused.model++;
    assert.deepEqual(actual, expected, `step ${step}: ${JSON.stringify(list.map((e) => [e.udid.slice(0, 8), e.keyHash.slice(0, 8)]))} into ${batch}`);
    const stored = (await devices(store)).map((d) => [d.udid, d.keyHash, d.batch, d.state]);
    const modelled = [...model.byUdid].sort(([a], [b]) => (a < b ? -1 : 1)).map(([udid, d]) => [udid, d.keyHash, d.batch, d.state]);
    assert.deepEqual(stored, modelled, `step ${step}: stored devices`);
  }
  // The random walk must have exercised both kinds of answer.
  assert.ok(refused.model > 3 && model.byUdid.size > 3, JSON.stringify({ refused, devices: model.byUdid.size }));
  t.diagnostic(`refused ${refused.model} of 60 steps; ${model.byUdid.size} devices`);
});
