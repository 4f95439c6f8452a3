// The device registry: products, lines, batches, devices, clones, idempotence, states, ownership,
// paging. Every test runs on SQLite and PostgreSQL, over one initialised authority per dialect.

import assert from 'node:assert/strict';
import { createHash, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { TestContext } from 'node:test';
import { verifyAuditLog } from '../../src/audit/audit-log.js';
import { Authority } from '../../src/authority/authority.js';
import { initAuthority } from '../../src/authority/init.js';
import { HallmarkError, type ErrorCode } from '../../src/errors.js';
import { createCsr } from '../../src/pki/csr.js';
import { encodeNameString } from '../../src/pki/names.js';
import { encodePem } from '../../src/pki/pem.js';
import type { Registry } from '../../src/registry/registry.js';
import type { Store } from '../../src/store/database.js';
import { forEachDialect, type StoreTarget, withDatabaseUrl } from '../helpers/db.js';
import { hasCode } from '../helpers/assertions.js';

const PASSPHRASE = 'registry test passphrase';
const ORG = 'Acme Registry';
const ACTOR = 'cli:test';


async function initOn(target: StoreTarget, home: string, rootDir: string): Promise<void> {
  await withDatabaseUrl(target.url, () => initAuthority({ home, rootDir, org: ORG, passphrase: PASSPHRASE, keyBackend: 'file', actor: ACTOR, tlsDnsNames: ['ca.test'] }));
}

interface DeviceKey { readonly privateKey: KeyObject; readonly spki: Buffer; readonly defaultUdid: string }

function newKey(kind: 'ec' | 'ed25519' = 'ec'): DeviceKey {
  const { privateKey, publicKey } = kind === 'ec' ? generateKeyPairSync('ec', { namedCurve: 'P-256' }) : generateKeyPairSync('ed25519');
  const spki = publicKey.export({ type: 'spki', format: 'der' });
  return { privateKey, spki, defaultUdid: createHash('sha256').update(spki).digest('hex') };
}

const csrOf = (key: DeviceKey): string => encodePem('CERTIFICATE REQUEST', createCsr({ subject: encodeNameString('CN=whatever'), privateKey: key.privateKey }));

async function auditCount(store: Store): Promise<number> {
  return Number((await store.db.selectFrom('audit_log').select((eb) => eb.fn.countAll().as('n')).executeTakeFirstOrThrow()).n);
}

async function deviceCount(store: Store): Promise<number> {
  return Number((await store.db.selectFrom('devices').select((eb) => eb.fn.countAll().as('n')).executeTakeFirstOrThrow()).n);
}

async function auditOf(store: Store, action: string, target?: string): Promise<Array<{ actor: string; target: string; details: Record<string, unknown> }>> {
  let q = store.db.selectFrom('audit_log').select(['actor', 'target', 'details']).where('action', '=', action);
  if (target) q = q.where('target', '=', target);
  return (await q.orderBy('seq').execute()).map((r) => ({ actor: r.actor, target: r.target, details: JSON.parse(r.details) as Record<string, unknown> }));
}

forEachDialect('registry', async (t: TestContext, target: StoreTarget) => {
  const home = join(target.dir, 'home');
  await initOn(target, home, join(target.dir, 'root'));
  const authority = await Authority.open(home, PASSPHRASE, await target.openStore());
  const registry: Registry = authority.registry;
  const observer = await target.openStore(); // another connection: sees only what was committed
  const newBatch = (quota = 100, more: { product?: string; line?: string; expiresAt?: Date } = {}) =>
    registry.createBatch({ product: more.product ?? 'sensor', line: more.line ?? 'line-1', quota, expiresAt: more.expiresAt, actor: ACTOR });
  try {
    await t.test('products, lines and batches are created, listed and audited', async () => {
      await registry.createProduct({ name: 'sensor', actor: ACTOR });
      await registry.createProduct({ name: 'gateway', validityDays: 730, actor: ACTOR });
      assert.deepEqual((await registry.listProducts()).map((p) => [p.name, p.profile, p.validityDays]), [['gateway', 'device', 730], ['sensor', 'device', 365]]);
      await registry.createLine({ name: 'line-1', ca: 'issuing-1', actor: ACTOR });
      await registry.createLine({ name: 'cm-shenzhen', ca: 'issuing-1', actor: ACTOR });
      assert.deepEqual((await registry.listLines()).map((l) => [l.name, l.ca, l.caStatus, l.refusedIssuances]), [['cm-shenzhen', 'issuing-1', 'active', 0], ['line-1', 'issuing-1', 'active', 0]]);
      const id = await newBatch(10);
      assert.match(id, /^b-[0-9a-f]{12}$/);
      const batch = await registry.batch(id);
      assert.deepEqual({ ...batch, createdAt: '' }, { id, product: 'sensor', line: 'line-1', quota: 10, issued: 0, refused: 0, registered: 0, allowUnregistered: false, requireApproval: false, expiresAt: null, createdAt: '' });
      assert.ok((await registry.listBatches()).some((b) => b.id === id));
      assert.deepEqual((await auditOf(observer, 'product.create')).map((a) => a.target), ['sensor', 'gateway']);
      assert.deepEqual((await auditOf(observer, 'line.create')).map((a) => [a.target, a.details.ca]), [['line-1', 'issuing-1'], ['cm-shenzhen', 'issuing-1']]);
      assert.deepEqual((await auditOf(observer, 'batch.create', id)).map((a) => [a.details.product, a.details.line, a.details.quota]), [['sensor', 'line-1', 10]]);
    });

    await t.test('bad product, line and batch requests get a clear error and change nothing', async () => {
      const before = await auditCount(observer);
      const batchesBefore = (await registry.listBatches()).length;
      const cases: Array<[string, () => Promise<unknown>, ErrorCode]> = [
        ['duplicate product', () => registry.createProduct({ name: 'sensor', actor: ACTOR }), 'ALREADY_EXISTS'],
        ['product name with a space', () => registry.createProduct({ name: 'bad name', actor: ACTOR }), 'BAD_REQUEST'],
        ['unknown profile', () => registry.createProduct({ name: 'p2', profile: 'nope', actor: ACTOR }), 'UNKNOWN_PROFILE'],
        ['CA profile for a product', () => registry.createProduct({ name: 'p3', profile: 'intermediate', actor: ACTOR }), 'PROFILE_VIOLATION'],
        ['zero validity', () => registry.createProduct({ name: 'p4', validityDays: 0, actor: ACTOR }), 'PROFILE_VIOLATION'],
        ['duplicate line', () => registry.createLine({ name: 'line-1', ca: 'issuing-1', actor: ACTOR }), 'ALREADY_EXISTS'],
        ['line under an unknown CA', () => registry.createLine({ name: 'l2', ca: 'nope', actor: ACTOR }), 'CA_NOT_FOUND'],
        ['line under the offline root', () => registry.createLine({ name: 'l3', ca: 'root', actor: ACTOR }), 'CA_NOT_ACTIVE'],
        ['batch of an unknown product', () => newBatch(5, { product: 'nope' }), 'PRODUCT_NOT_FOUND'],
        ['batch on an unknown line', () => newBatch(5, { line: 'nope' }), 'LINE_NOT_FOUND'],
        ['negative quota', () => newBatch(-1), 'BAD_REQUEST'],
        ['fractional quota', () => newBatch(1.5), 'BAD_REQUEST'],
        ['NaN quota', () => newBatch(Number.NaN), 'BAD_REQUEST'],
        ['quota above the maximum', () => newBatch(100_000_001), 'BAD_REQUEST'],
        ['expiry in the past', () => newBatch(5, { expiresAt: new Date(Date.now() - 1000) }), 'BAD_REQUEST'],
        ['unknown batch', () => registry.batch('b-000000000000'), 'BATCH_NOT_FOUND'],
      ];
      for (const [name, fn, code] of cases) await assert.rejects(fn(), hasCode(code), name);
      assert.equal(await auditCount(observer), before, 'no audit entry');
      assert.deepEqual((await registry.listProducts()).map((p) => p.name), ['gateway', 'sensor']);
      assert.deepEqual((await registry.listLines()).map((l) => l.name), ['cm-shenzhen', 'line-1']);
      assert.equal((await registry.listBatches()).length, batchesBefore);
    });

    await t.test('register: the default UDID is the hex SHA-256 of the SPKI DER; the device is registered and audited', async () => {
      const batch = await newBatch();
      for (const kind of ['ec', 'ed25519'] as const) {
        const key = newKey(kind);
        const device = await registry.registerDevice(batch, { publicKeySpki: key.spki, serialNumber: 'SN-0001' }, ACTOR);
        assert.equal(device.udid, key.defaultUdid);
        assert.equal(device.publicKeySha256, key.defaultUdid);
        assert.deepEqual([device.state, device.product, device.line, device.batch, device.tenant, device.serialNumber, device.hasBirthCertificate, device.provisionedAt],
          ['registered', 'sensor', 'line-1', batch, 'default', 'SN-0001', false, null]);
        const stored = await observer.db.selectFrom('devices').selectAll().where('udid', '=', key.defaultUdid).executeTakeFirstOrThrow();
        assert.ok(Buffer.from(stored.public_key_spki).equals(key.spki), 'the key itself is stored');
        const audit = await auditOf(observer, 'device.register', key.defaultUdid);
        assert.deepEqual(audit.map((a) => [a.actor, a.details.batch]), [[ACTOR, batch]]);
      }
      // A PEM-wrapped or otherwise re-encoded key is the same key: one canonical SPKI, one UDID.
      const key = newKey();
      const d = await registry.registerDevice(batch, { publicKeySpki: Buffer.from(key.spki) }, ACTOR);
      assert.equal((await registry.device(d.udid.toUpperCase())).udid, key.defaultUdid, 'lookup is case-insensitive');
      assert.equal((await registry.batch(batch)).registered, 3);
    });

    await t.test('register: an explicit UDID is normalised and kept with the key; a bad UDID, serial or key is refused', async () => {
      const batch = await newBatch();
      const key = newKey();
      const device = await registry.registerDevice(batch, { publicKeySpki: key.spki, udid: '01:23:AB:CD:EF:45' }, ACTOR);
      assert.equal(device.udid, '0123abcdef45');
      assert.equal(device.publicKeySha256, key.defaultUdid);
      const before = await deviceCount(observer);
      const cases: Array<[string, Parameters<Registry['registerDevice']>[1], ErrorCode]> = [
        ['non-hex UDID', { publicKeySpki: newKey().spki, udid: 'not-hex!' }, 'BAD_REQUEST'],
        ['odd-length UDID', { publicKeySpki: newKey().spki, udid: 'abc' }, 'BAD_REQUEST'],
        ['UDID longer than 32 bytes', { publicKeySpki: newKey().spki, udid: 'ab'.repeat(33) }, 'BAD_REQUEST'],
        ['serial with a quote mark', { publicKeySpki: newKey().spki, serialNumber: 'SN"1' }, 'BAD_REQUEST'],
        ['garbage key', { publicKeySpki: Buffer.from('3003020100', 'hex') }, 'UNSUPPORTED_ALGORITHM'],
        ['bad tenant name', { publicKeySpki: newKey().spki, tenant: 'a b' }, 'BAD_REQUEST'],
      ];
      for (const [name, reg, code] of cases) await assert.rejects(registry.registerDevice(batch, reg, ACTOR), hasCode(code), name);
      await assert.rejects(registry.registerDevice('b-ffffffffffff', { publicKeySpki: newKey().spki }, ACTOR), hasCode('BATCH_NOT_FOUND'));
      assert.equal(await deviceCount(observer), before);
    });

    await t.test('the same key in another batch, under another UDID, or a UDID with another key -> CLONE_DETECTED, audited naming both batches, nothing stored', async () => {
      const first = await newBatch();
      const second = await registry.createBatch({ product: 'gateway', line: 'cm-shenzhen', quota: 5, actor: ACTOR });
      const key = newKey();
      const original = await registry.registerDevice(first, { publicKeySpki: key.spki }, ACTOR);
      const other = newKey();
      const cases: Array<[string, string, Parameters<Registry['registerDevice']>[1], string]> = [
        ['the same key in another batch', second, { publicKeySpki: key.spki }, key.defaultUdid],
        ['the same key under another UDID (same batch)', first, { publicKeySpki: key.spki, udid: 'c10e0001' }, 'c10e0001'],
        ['the same key under another UDID in another batch', second, { publicKeySpki: key.spki, udid: 'c10e0002' }, 'c10e0002'],
        ['the same UDID with another key', second, { publicKeySpki: other.spki, udid: key.defaultUdid }, key.defaultUdid],
      ];
      for (const [name, batch, reg, udid] of cases) {
        const devices = await deviceCount(observer);
        const audits = await auditCount(observer);
        await assert.rejects(registry.registerDevice(batch, reg, 'cli:mallory'), hasCode('CLONE_DETECTED'), name);
        assert.equal(await deviceCount(observer), devices, `${name}: nothing stored`);
        assert.equal(await auditCount(observer), audits + 1, `${name}: exactly one audit entry`);
        const [entry] = (await auditOf(observer, 'device.clone_refused', udid)).slice(-1);
        assert.ok(entry, `${name}: device.clone_refused audited`);
        assert.equal(entry.actor, 'cli:mallory');
        assert.equal(entry.details.batch, batch, `${name}: the batch of the attempt`);
        assert.equal(entry.details.existingBatch, first, `${name}: the batch of the device already registered`);
      }
      assert.deepEqual(await registry.device(original.udid), original, 'the original device is untouched');
      await assert.rejects(registry.device('c10e0001'), hasCode('DEVICE_NOT_FOUND'));
      assert.equal((await registry.batch(second)).registered, 0);
      assert.equal((await verifyAuditLog(observer.db)).ok, true);
    });

    await t.test('registerDevices is atomic: one clone in the list and nothing of the list is stored', async () => {
      const batch = await newBatch();
      const other = await newBatch();
      const held = newKey();
      await registry.registerDevice(other, { publicKeySpki: held.spki }, ACTOR);
      const fresh = [newKey(), newKey(), newKey()];
      const devices = await deviceCount(observer);
      const audits = await auditCount(observer);
      await assert.rejects(registry.registerDevices(batch, [{ publicKeySpki: fresh[0]!.spki }, { publicKeySpki: fresh[1]!.spki }, { publicKeySpki: held.spki }, { publicKeySpki: fresh[2]!.spki }], ACTOR), (err) => {
        hasCode('CLONE_DETECTED')(err);
        assert.match((err as Error).message, /entry 3/, 'the message names the entry');
        return true;
      });
      assert.equal(await deviceCount(observer), devices);
      for (const k of fresh) await assert.rejects(registry.device(k.defaultUdid), hasCode('DEVICE_NOT_FOUND'));
      assert.equal(await auditCount(observer), audits + 1);
      assert.deepEqual((await auditOf(observer, 'device.clone_refused', held.defaultUdid)).map((a) => [a.details.batch, a.details.existingBatch]), [[batch, other]]);
      // The same key twice in one list is refused too, before anything is written.
      const dup = newKey();
      await assert.rejects(registry.registerDevices(batch, [{ publicKeySpki: dup.spki }, { publicKeySpki: newKey().spki }, { publicKeySpki: dup.spki, udid: 'aa' }], ACTOR), hasCode('CLONE_DETECTED'));
      assert.equal(await deviceCount(observer), devices);
      assert.equal((await registry.batch(batch)).registered, 0);
    });

    await t.test('registering the same devices again changes nothing: unchanged, no new audit entries', async () => {
      const batch = await newBatch();
      const keys = Array.from({ length: 5 }, () => newKey());
      const regs = keys.map((k, i) => ({ publicKeySpki: k.spki, serialNumber: `IDEM-${i}` }));
      assert.deepEqual(await registry.registerDevices(batch, regs, ACTOR), Array(5).fill('registered'));
      const devices = await deviceCount(observer);
      const audits = await auditCount(observer);
      const snapshot = await Promise.all(keys.map((k) => registry.device(k.defaultUdid)));
      assert.deepEqual(await registry.registerDevices(batch, regs, ACTOR), Array(5).fill('unchanged'));
      assert.deepEqual(await registry.registerDevices(batch, regs.slice(1, 3), ACTOR), ['unchanged', 'unchanged']);
      assert.equal(await deviceCount(observer), devices);
      assert.equal(await auditCount(observer), audits, 'no audit entry for an unchanged device');
      assert.deepEqual(await Promise.all(keys.map((k) => registry.device(k.defaultUdid))), snapshot);
      // A mix: the known ones unchanged, the new one registered and audited (alone).
      const extra = newKey();
      assert.deepEqual(await registry.registerDevices(batch, [...regs.slice(0, 2), { publicKeySpki: extra.spki }], ACTOR), ['unchanged', 'unchanged', 'registered']);
      assert.equal(await auditCount(observer), audits + 1);
      assert.equal((await registry.batch(batch)).registered, 6);
    });

    await t.test('state transitions: suspend / resume / decommission; illegal ones -> ILLEGAL_TRANSITION', async () => {
      const batch = await newBatch();
      const key = newKey();
      const { udid } = await registry.registerDevice(batch, { publicKeySpki: key.spki }, ACTOR);
      // A registered device has no identity yet: nothing to suspend or resume.
      await assert.rejects(registry.changeState(udid, 'suspend', ACTOR), hasCode('ILLEGAL_TRANSITION'));
      await assert.rejects(registry.changeState(udid, 'resume', ACTOR), hasCode('ILLEGAL_TRANSITION'));
      await authority.issueForDevice({ udid, csr: csrOf(key), actor: ACTOR });
      assert.equal((await registry.device(udid)).state, 'provisioned');
      await assert.rejects(registry.changeState(udid, 'resume', ACTOR), hasCode('ILLEGAL_TRANSITION'), 'resume a provisioned device');
      assert.equal((await registry.changeState(udid, 'suspend', ACTOR)).state, 'suspended');
      await assert.rejects(registry.changeState(udid, 'suspend', ACTOR), hasCode('ILLEGAL_TRANSITION'), 'suspend twice');
      assert.equal((await registry.changeState(udid, 'resume', ACTOR)).state, 'active');
      assert.equal((await registry.changeState(udid, 'suspend', ACTOR)).state, 'suspended');
      assert.equal((await registry.changeState(udid, 'resume', ACTOR)).state, 'active');
      assert.equal((await registry.changeState(udid, 'decommission', ACTOR)).state, 'decommissioned');
      for (const action of ['suspend', 'resume', 'decommission', 'revoke'] as const) {
        await assert.rejects(registry.changeState(udid, action, ACTOR), hasCode('ILLEGAL_TRANSITION'), `${action} a decommissioned device`);
      }
      await assert.rejects(registry.transfer(udid, 'someone', ACTOR), hasCode('ILLEGAL_TRANSITION'));
      await assert.rejects(registry.changeState('abcdef', 'suspend', ACTOR), hasCode('DEVICE_NOT_FOUND'));
      const audit = await observer.db.selectFrom('audit_log').select(['action', 'details']).where('target', '=', udid).orderBy('seq').execute();
      assert.deepEqual(audit.map((a) => a.action), ['device.register', 'device.suspend', 'device.resume', 'device.suspend', 'device.resume', 'device.decommission']);
      assert.deepEqual(audit.filter((a) => a.action !== 'device.register').map((a) => { const d = JSON.parse(a.details) as { from: string; to: string }; return `${d.from}>${d.to}`; }),
        ['provisioned>suspended', 'suspended>active', 'active>suspended', 'suspended>active', 'active>decommissioned']);
      // Revoking (any live state -> revoked) is also a transition, and a revoked device can still be decommissioned.
      const k2 = newKey();
      const d2 = await registry.registerDevice(batch, { publicKeySpki: k2.spki }, ACTOR);
      assert.equal((await registry.changeState(d2.udid, 'revoke', ACTOR)).state, 'revoked');
      await assert.rejects(registry.changeState(d2.udid, 'resume', ACTOR), hasCode('ILLEGAL_TRANSITION'));
      assert.equal((await registry.changeState(d2.udid, 'decommission', ACTOR)).state, 'decommissioned');
    });

    await t.test('decommission revokes the device certificates (cessationOfOperation); the device can then be registered anew', async () => {
      const batch = await newBatch();
      const key = newKey();
      const { udid } = await registry.registerDevice(batch, { publicKeySpki: key.spki, serialNumber: 'EOL-1' }, ACTOR);
      const first = await authority.issueForDevice({ udid, csr: csrOf(key), actor: ACTOR });
      const renewed = await authority.issueForDevice({ udid, csr: csrOf(key), actor: ACTOR });
      const bystander = newKey();
      const b = await registry.registerDevice(batch, { publicKeySpki: bystander.spki }, ACTOR);
      const bystanderCert = await authority.issueForDevice({ udid: b.udid, csr: csrOf(bystander), actor: ACTOR });
      await registry.changeState(udid, 'decommission', 'cli:operator');
      const rows = await observer.db.selectFrom('certificates').select(['serial', 'status', 'revocation_reason', 'revoked_at']).where('device_udid', '=', udid).orderBy('serial').execute();
      assert.deepEqual(rows.map((r) => r.serial).sort(), [first.serial, renewed.serial].sort());
      for (const r of rows) {
        assert.equal(r.status, 'revoked');
        assert.equal(r.revocation_reason, 'cessationOfOperation');
        assert.ok(r.revoked_at);
      }
      const other = await observer.db.selectFrom('certificates').select('status').where('serial', '=', bystanderCert.serial).executeTakeFirstOrThrow();
      assert.equal(other.status, 'valid', 'another device keeps its certificate');
      const [entry] = await auditOf(observer, 'device.decommission', udid);
      assert.equal(entry?.details.certificatesRevoked, 2);
      assert.equal(entry?.actor, 'cli:operator');
      // The end of life is not the end of the key's record: registering it again (another batch, here) brings it back.
      const next = await registry.createBatch({ product: 'gateway', line: 'cm-shenzhen', quota: 5, actor: ACTOR });
      assert.deepEqual(await registry.registerDevices(next, [{ publicKeySpki: key.spki, serialNumber: 'EOL-1B', tenant: 'refurb' }], ACTOR), ['re-registered']);
      const again = await registry.device(udid);
      assert.deepEqual([again.state, again.batch, again.product, again.line, again.serialNumber, again.tenant, again.provisionedAt], ['registered', next, 'gateway', 'cm-shenzhen', 'EOL-1B', 'refurb', null]);
      assert.deepEqual((await auditOf(observer, 'device.reregister', udid)).map((a) => [a.details.batch, a.details.previousBatch]), [[next, batch]]);
      // ...and it gets a new identity under its new batch; the old certificates stay revoked.
      const reissued = await authority.issueForDevice({ udid, csr: csrOf(key), actor: ACTOR });
      assert.equal((await registry.device(udid)).state, 'provisioned');
      assert.equal((await registry.batch(next)).issued, 1);
      const statuses = await observer.db.selectFrom('certificates').select(['serial', 'status']).where('device_udid', '=', udid).execute();
      assert.deepEqual(statuses.filter((s) => s.status === 'valid').map((s) => s.serial), [reissued.serial]);
      // Registered anew into its original batch works too (after another end of life).
      await registry.changeState(udid, 'decommission', ACTOR);
      assert.deepEqual(await registry.registerDevices(batch, [{ publicKeySpki: key.spki }], ACTOR), ['re-registered']);
      assert.equal((await registry.device(udid)).batch, batch);
    });

    await t.test('transfer of ownership is audited with from and to', async () => {
      const batch = await newBatch();
      const { udid } = await registry.registerDevice(batch, { publicKeySpki: newKey().spki, tenant: 'acme' }, ACTOR);
      assert.equal((await registry.device(udid)).tenant, 'acme');
      assert.equal((await registry.transfer(udid, 'globex', 'cli:sales')).tenant, 'globex');
      assert.equal((await registry.transfer(udid, 'initech', 'cli:sales')).tenant, 'initech');
      assert.deepEqual((await auditOf(observer, 'device.transfer', udid)).map((a) => [a.actor, a.details.from, a.details.to]), [['cli:sales', 'acme', 'globex'], ['cli:sales', 'globex', 'initech']]);
      const audits = await auditCount(observer);
      await assert.rejects(registry.transfer(udid, 'initech', ACTOR), hasCode('ILLEGAL_TRANSITION'), 'to its current owner');
      await assert.rejects(registry.transfer(udid, 'no spaces', ACTOR), hasCode('BAD_REQUEST'));
      await assert.rejects(registry.transfer('0badcafe', 'globex', ACTOR), hasCode('DEVICE_NOT_FOUND'));
      assert.equal(await auditCount(observer), audits);
      assert.equal((await registry.device(udid)).tenant, 'initech');
    });

    await t.test('listDevices pages by a cursor that covers every device exactly once; filters by batch, state and tenant', async () => {
      const batch = await newBatch();
      const keys = Array.from({ length: 23 }, () => newKey());
      await registry.registerDevices(batch, keys.map((k, i) => ({ publicKeySpki: k.spki, tenant: i % 3 === 0 ? 'paging-tenant' : undefined })), ACTOR);
      const expected = keys.map((k) => k.defaultUdid).sort();
      for (const limit of [1, 5, 7, 23, 50]) {
        const seen: string[] = [];
        let after: string | undefined;
        let pages = 0;
        for (;;) {
          const page = await registry.listDevices({ batch, limit, after });
          pages++;
          assert.ok(page.items.length <= limit);
          seen.push(...page.items.map((d) => d.udid));
          if (!page.next) break;
          assert.equal(page.next, page.items[page.items.length - 1]!.udid);
          after = page.next;
          assert.ok(pages < 100, 'paging terminates');
        }
        assert.deepEqual(seen, expected, `limit ${limit}: every device once, in UDID order`);
        assert.equal(pages, Math.max(1, Math.ceil(23 / limit)), `limit ${limit}: no empty trailing page`);
      }
      const all = await registry.listDevices({ limit: 1000 });
      assert.ok(all.items.length > 23, 'without a filter the other batches are listed too');
      assert.ok(all.items.every((d, i) => i === 0 || all.items[i - 1]!.udid < d.udid));
      const tenantPage = await registry.listDevices({ tenant: 'paging-tenant' });
      assert.deepEqual(tenantPage.items.map((d) => d.udid), keys.filter((_, i) => i % 3 === 0).map((k) => k.defaultUdid).sort());
      // Suspend two of them (after issuing), then filter by state and by state + batch.
      for (const k of keys.slice(0, 2)) {
        await authority.issueForDevice({ udid: k.defaultUdid, csr: csrOf(k), actor: ACTOR });
        await registry.changeState(k.defaultUdid, 'suspend', ACTOR);
      }
      await authority.issueForDevice({ udid: keys[2]!.defaultUdid, csr: csrOf(keys[2]!), actor: ACTOR });
      const suspended = await registry.listDevices({ batch, state: 'suspended' });
      assert.deepEqual(suspended.items.map((d) => d.udid), keys.slice(0, 2).map((k) => k.defaultUdid).sort());
      assert.ok(suspended.items.every((d) => d.state === 'suspended'));
      assert.deepEqual((await registry.listDevices({ batch, state: 'provisioned' })).items.map((d) => d.udid), [keys[2]!.defaultUdid]);
      assert.equal((await registry.listDevices({ batch, state: 'registered', limit: 1000 })).items.length, 20);
      assert.deepEqual((await registry.listDevices({ batch, state: 'suspended', tenant: 'paging-tenant' })).items.map((d) => d.udid), [keys[0]!.defaultUdid]);
      assert.deepEqual((await registry.listDevices({ batch: 'b-000000000000' })).items, []);
    });

    await t.test('a batch past its expiry refuses registration with BATCH_EXPIRED', async () => {
      const batch = await newBatch(10, { expiresAt: new Date(Date.now() + 400) });
      const early = newKey();
      assert.equal((await registry.registerDevice(batch, { publicKeySpki: early.spki }, ACTOR)).state, 'registered');
      assert.ok((await registry.batch(batch)).expiresAt);
      await sleep(500);
      const devices = await deviceCount(observer);
      const audits = await auditCount(observer);
      await assert.rejects(registry.registerDevice(batch, { publicKeySpki: newKey().spki }, ACTOR), hasCode('BATCH_EXPIRED'));
      assert.equal(await deviceCount(observer), devices);
      assert.equal(await auditCount(observer), audits);
      // Its devices get no first identity either.
      await assert.rejects(authority.issueForDevice({ udid: early.defaultUdid, csr: csrOf(early), actor: ACTOR }), hasCode('BATCH_EXPIRED'));
      assert.equal((await registry.device(early.defaultUdid)).state, 'registered');
    });

    await t.test('the audit chain verifies after all of it', async () => {
      const verdict = await verifyAuditLog(observer.db);
      assert.ok(verdict.ok, JSON.stringify(verdict));
    });
  } finally {
    await authority.close();
  }
}, { timeout: 180_000 });
