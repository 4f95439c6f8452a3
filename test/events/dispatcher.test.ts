// Webhooks end to end against a real receiver on 127.0.0.1: events read from the audit log (issued,
// revoked, quota-exceeded, clone-detected) and the expiring scan, HMAC signatures, retries with
// backoff, failure after the configured attempts, disable / retry, the secret never logged, and the
// cursor: a restart (or a second process) delivers nothing twice. On SQLite and PostgreSQL.

import assert from 'node:assert/strict';
import { createHash, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { Authority } from '../../src/authority/authority.js';
import { initAuthority } from '../../src/authority/init.js';
import { WebhookDispatcher, type WebhookDispatcherOptions } from '../../src/events/dispatcher.js';
import { AUDIT_CURSOR, createWebhook, disableWebhook, listDeliveries, listWebhooks, retryDelivery, signatureHeader, verifySignature, type WebhookEvent } from '../../src/events/webhooks.js';
import { HallmarkError, type ErrorCode } from '../../src/errors.js';
import { createCsr } from '../../src/pki/csr.js';
import { encodeNameString } from '../../src/pki/names.js';
import { encodePem } from '../../src/pki/pem.js';
import { forEachDialect, type StoreTarget, withDatabaseUrl } from '../helpers/db.js';
import { deadPort, startReceiver, type Receiver } from './receiver.js';
import { hasCode } from '../helpers/assertions.js';

const PASSPHRASE = 'webhook test passphrase';
const ACTOR = 'cli:test';
const EVENTS: WebhookEvent[] = ['issued', 'revoked', 'quota-exceeded', 'clone-detected'];


interface DeviceKey { readonly privateKey: KeyObject; readonly spki: Buffer; readonly udid: string }
function newKey(): DeviceKey {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const spki = publicKey.export({ type: 'spki', format: 'der' });
  return { privateKey, spki, udid: createHash('sha256').update(spki).digest('hex') };
}
const csrOf = (key: DeviceKey): string => encodePem('CERTIFICATE REQUEST', createCsr({ subject: encodeNameString('CN=x'), privateKey: key.privateKey }));

forEachDialect('webhooks', async (t: TestContext, target: StoreTarget) => {
  const home = join(target.dir, 'home');
  await withDatabaseUrl(target.url, () => initAuthority({ home, rootDir: join(target.dir, 'root'), org: 'Acme', passphrase: PASSPHRASE, keyBackend: 'file', actor: ACTOR }));
  const authority = await Authority.open(home, PASSPHRASE, await target.openStore());
  const store = authority.store;
  const registry = authority.registry;
  const logs: string[] = [];
  const logger = { info: (o: object, m?: string) => { logs.push(`${m ?? ''} ${JSON.stringify(o)}`); }, warn: (o: object, m?: string) => { logs.push(`${m ?? ''} ${JSON.stringify(o)}`); } };
  const dispatcher = (o: WebhookDispatcherOptions = {}, s = store) => new WebhookDispatcher(s, { backoffMs: [30, 30], timeoutMs: 2000, logger, ...o });
  const receivers: Receiver[] = [];
  const receiver = async (secret?: string): Promise<Receiver> => { const r = await startReceiver({ secret }); receivers.push(r); return r; };
  /** A webhook with its own receiver (which checks the signature with the webhook's secret). */
  const hook = async (events: readonly WebhookEvent[] = EVENTS) => {
    const r = await receiver();
    const created = await createWebhook(store, { url: r.url, events, actor: ACTOR });
    r.secret = created.secret;
    return { ...created, receiver: r };
  };

  await registry.createProduct({ name: 'meter', actor: ACTOR });
  await registry.createProduct({ name: 'shortlived', validityDays: 1, actor: ACTOR });
  await registry.createProduct({ name: 'quarterly', validityDays: 90, actor: ACTOR });
  let lines = 0;
  const batchOf = async (quota = 20, product = 'meter') => {
    const line = `line-${++lines}`;
    await registry.createLine({ name: line, ca: 'issuing-1', actor: ACTOR });
    return { line, batch: await registry.createBatch({ product, line, quota, actor: ACTOR }) };
  };
  const device = async (batch: string): Promise<DeviceKey> => {
    const key = newKey();
    await registry.registerDevice(batch, { publicKeySpki: key.spki }, ACTOR);
    return key;
  };
  const issue = async (key: DeviceKey) => (await authority.issueForDevice({ udid: key.udid, csr: csrOf(key), actor: ACTOR })).serial;

  try {
    await t.test('create: URL and events are checked, the secret is returned once and stored nowhere it can be read back', async () => {
      for (const [url, events] of [['ftp://x.test/', ['issued']], ['not a url', ['issued']], ['https://user:pw@x.test/', ['issued']], ['https://x.test/', ['issued', 'exploded']], ['https://x.test/', []]] as const) {
        await assert.rejects(createWebhook(store, { url, events, actor: ACTOR }), hasCode('BAD_REQUEST'), `${url} ${events.join(',')}`);
      }
      const created = await createWebhook(store, { url: 'https://fleet.example/hooks?token=abc', events: 'revoked,issued', actor: ACTOR });
      assert.match(created.id, /^wh_[0-9a-f]{16}$/);
      assert.match(created.secret, /^whsec_[A-Za-z0-9_-]{43}$/);
      assert.deepEqual(created.events, ['issued', 'revoked']);
      const [listed] = (await listWebhooks(store)).filter((w) => w.id === created.id);
      assert.ok(listed);
      assert.equal(listed.status, 'active');
      assert.deepEqual(listed.deliveries, { pending: 0, delivered: 0, failed: 0 });
      assert.ok(!JSON.stringify(listed).includes(created.secret));
      const audit = await store.db.selectFrom('audit_log').select(['action', 'target', 'details']).where('target', '=', created.id).execute();
      assert.deepEqual(audit.map((a) => a.action), ['webhook.create']);
      assert.deepEqual(JSON.parse(audit[0]!.details), { url: 'https://fleet.example/hooks', events: ['issued', 'revoked'] });
      const everything = JSON.stringify(await store.db.selectFrom('audit_log').selectAll().execute());
      assert.ok(!everything.includes(created.secret), 'the secret is not in the audit log');
      // The first webhook starts the cursor at the head: history is not replayed.
      const head = Number((await store.db.selectFrom('audit_log').select('seq').orderBy('seq', 'desc').limit(1).executeTakeFirstOrThrow()).seq);
      assert.equal((await store.db.selectFrom('cursors').select('value').where('name', '=', AUDIT_CURSOR).executeTakeFirstOrThrow()).value, String(head));
      await disableWebhook(store, created.id, ACTOR);
      await assert.rejects(disableWebhook(store, created.id, ACTOR), hasCode('ILLEGAL_TRANSITION'));
      await assert.rejects(disableWebhook(store, 'wh_0000000000000000', ACTOR), hasCode('NOT_FOUND'));
      assert.equal((await store.db.selectFrom('audit_log').select('action').where('target', '=', created.id).orderBy('seq').execute()).map((a) => a.action).join(), 'webhook.create,webhook.disable');
    });

    await t.test('signature: v1 is HMAC-SHA256 of "<t>.<body>"; a changed body, another secret or an old timestamp fail', () => {
      const body = '{"id":"evt_1","event":"issued","at":"2024-01-01T00:00:00.000Z","data":{}}';
      const header = signatureHeader('whsec_k', body, new Date(1_700_000_000_000));
      assert.match(header, /^t=1700000000,v1=[0-9a-f]{64}$/);
      const now = new Date(1_700_000_010_000);
      assert.equal(verifySignature('whsec_k', body, header, { now }), true);
      assert.equal(verifySignature('whsec_k', body.replace('issued', 'revoked'), header, { now }), false);
      assert.equal(verifySignature('whsec_other', body, header, { now }), false);
      assert.equal(verifySignature('whsec_k', body, header, { now: new Date(1_700_001_000_000) }), false);
      assert.equal(verifySignature('whsec_k', body, undefined, { now }), false);
    });

    await t.test('issued, quota-exceeded, clone-detected and revoked arrive signed, with their data', async () => {
      const h = await hook();
      const d = dispatcher();
      const { line, batch } = await batchOf(1);
      const a = await device(batch);
      const serial = await issue(a);
      const b = await device(batch);
      await assert.rejects(issue(b), hasCode('QUOTA_EXCEEDED'));
      const other = await batchOf(5);
      await assert.rejects(registry.registerDevice(other.batch, { publicKeySpki: a.spki }, ACTOR), hasCode('CLONE_DETECTED'));
      await authority.revoke({ serial }, 'keyCompromise', ACTOR);
      await h.receiver.waitFor((rs) => rs.length >= 4, 10_000, () => d.runOnce());
      const r = h.receiver;
      assert.equal(r.requests.length, 4, r.requests.map((x) => x.raw).join('\n'));
      for (const req of r.requests) {
        assert.equal(req.signatureOk, true, 'signature verifies with the secret');
        assert.equal(req.headers['content-type'], 'application/json');
        assert.equal(req.headers['hallmark-event'], req.body.event);
        assert.match(String(req.headers['hallmark-delivery']), /^\d+$/);
        assert.match(String(req.headers['hallmark-signature']), /^t=\d+,v1=[0-9a-f]{64}$/);
        assert.match(req.body.id, /^evt_\d+$/);
        assert.ok(!Number.isNaN(Date.parse(req.body.at)));
        assert.ok(!req.raw.includes(h.secret));
      }
      const [issued] = r.of('issued');
      assert.equal(issued!.body.data.serial, serial);
      assert.equal(issued!.body.data.device, a.udid);
      assert.equal(issued!.body.data.batch, batch);
      assert.equal(issued!.body.data.line, line);
      assert.equal(issued!.body.data.issuer, 'issuing-1');
      assert.equal(issued!.body.data.profile, 'device');
      assert.equal(issued!.body.data.actor, ACTOR);
      assert.ok(Date.parse(String(issued!.body.data.notAfter)) > Date.now());
      const [quota] = r.of('quota-exceeded');
      assert.equal(quota!.body.data.device, b.udid);
      assert.equal(quota!.body.data.batch, batch);
      const [clone] = r.of('clone-detected');
      assert.equal(clone!.body.data.device, a.udid);
      assert.equal(clone!.body.data.batch, other.batch);
      assert.equal(clone!.body.data.existingBatch, batch);
      const [revoked] = r.of('revoked');
      assert.deepEqual({ kind: revoked!.body.data.kind, serial: revoked!.body.data.serial, reason: revoked!.body.data.reason, device: revoked!.body.data.device }, { kind: 'certificate', serial, reason: 'keyCompromise', device: a.udid });
      // The order of the audit log is kept in the ids, and each event has its own id.
      assert.equal(new Set(r.requests.map((x) => x.body.id)).size, 4);
      assert.ok(Number(issued!.body.id.slice(4)) < Number(revoked!.body.id.slice(4)));
      const deliveries = await listDeliveries(store, { webhook: h.id });
      assert.equal(deliveries.length, 4);
      for (const x of deliveries) assert.deepEqual([x.status, x.attempts, x.lastStatus, x.lastError], ['delivered', 1, 200, null]);
      assert.deepEqual((await listWebhooks(store)).find((w) => w.id === h.id)!.deliveries, { pending: 0, delivered: 4, failed: 0 });
      await d.runOnce();
      assert.equal(r.requests.length, 4, 'nothing is sent twice');
      await disableWebhook(store, h.id, ACTOR);
    });

    await t.test('revoking or decommissioning a device: revoked for each certificate and for the device', async () => {
      const h = await hook(['revoked']);
      const d = dispatcher();
      const { batch } = await batchOf();
      const c = await device(batch);
      const serialC = await issue(c);
      const e = await device(batch);
      await issue(e);
      await authority.revoke({ device: c.udid }, 'superseded', ACTOR);
      await registry.changeState(e.udid, 'decommission', ACTOR);
      await h.receiver.waitFor((rs) => rs.length >= 3, 10_000, () => d.runOnce());
      const data = h.receiver.requests.map((x) => x.body.data);
      assert.ok(data.some((x) => x.kind === 'certificate' && x.serial === serialC && x.reason === 'superseded' && x.device === c.udid));
      assert.ok(data.some((x) => x.kind === 'device' && x.device === c.udid && x.reason === 'superseded' && x.certificatesRevoked === 1));
      assert.ok(data.some((x) => x.kind === 'device' && x.device === e.udid && x.reason === 'cessationOfOperation' && x.decommissioned === true && x.certificatesRevoked === 1));
      assert.equal(h.receiver.of('issued').length, 0, 'not subscribed');
      await disableWebhook(store, h.id, ACTOR);
    });

    await t.test('a webhook gets only its events, only those after its creation; disabling drops what is pending', async () => {
      const d = dispatcher();
      const { batch } = await batchOf();
      const before = await device(batch);
      const early = await issue(before);
      const h = await hook(['issued']);
      const later = await device(batch);
      const serial = await issue(later);
      await authority.revoke({ serial: early }, 'unspecified', ACTOR);
      await h.receiver.waitFor((rs) => rs.length >= 1, 10_000, () => d.runOnce());
      await d.runOnce();
      assert.deepEqual(h.receiver.requests.map((x) => [x.body.event, x.body.data.serial]), [['issued', serial]]);
      // Collected but not yet sent, then disabled: failed, visible, never sent, and retry refuses it.
      await issue(await device(batch));
      assert.equal(await d.collect(), 1);
      const pending = await listDeliveries(store, { webhook: h.id, status: 'pending' });
      assert.equal(pending.length, 1);
      await disableWebhook(store, h.id, ACTOR);
      const [dropped] = await listDeliveries(store, { webhook: h.id, status: 'failed' });
      assert.equal(dropped!.id, pending[0]!.id);
      assert.equal(dropped!.lastError, 'webhook disabled');
      await assert.rejects(retryDelivery(store, dropped!.id), hasCode('ILLEGAL_TRANSITION'));
      await issue(await device(batch));
      await d.runOnce();
      assert.equal(h.receiver.requests.length, 1);
    });

    await t.test('a receiver answering 500 then 200 gets the retry, with the same body', async () => {
      const h = await hook(['issued']);
      h.receiver.answers = [500];
      const d = dispatcher();
      const { batch } = await batchOf();
      const serial = await issue(await device(batch));
      await h.receiver.waitFor((rs) => rs.length >= 2, 10_000, () => d.runOnce());
      const [first, second] = h.receiver.requests;
      assert.equal(first!.answered, 500);
      assert.equal(second!.answered, 200);
      assert.equal(first!.raw, second!.raw);
      assert.equal(first!.headers['hallmark-delivery'], second!.headers['hallmark-delivery']);
      assert.equal(second!.signatureOk, true);
      assert.equal(second!.body.data.serial, serial);
      const [delivery] = await listDeliveries(store, { webhook: h.id });
      assert.deepEqual([delivery!.status, delivery!.attempts, delivery!.lastStatus, delivery!.lastError], ['delivered', 2, 200, null]);
      assert.ok(delivery!.deliveredAt);
      await disableWebhook(store, h.id, ACTOR);
    });

    await t.test('a receiver that is down: failed after the configured attempts, visible, the secret never logged; retry sends it again', async () => {
      const port = await deadPort();
      const created = await createWebhook(store, { url: `http://127.0.0.1:${port}/down?key=receiver-token`, events: ['issued'], actor: ACTOR });
      logs.length = 0;
      const d = dispatcher({ backoffMs: [20, 20] });
      assert.equal(d.maxAttempts, 3);
      const { batch } = await batchOf();
      await issue(await device(batch));
      const deadline = Date.now() + 10_000;
      for (;;) {
        await d.runOnce();
        const [x] = await listDeliveries(store, { webhook: created.id });
        if (x?.status === 'failed') break;
        assert.ok(Date.now() < deadline, `still ${x?.status} after ${x?.attempts} attempts`);
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
      const [failed] = await listDeliveries(store, { webhook: created.id, status: 'failed' });
      assert.equal(failed!.attempts, 3);
      assert.equal(failed!.lastStatus, null);
      assert.match(failed!.lastError!, /ECONNREFUSED/);
      assert.deepEqual((await listWebhooks(store)).find((w) => w.id === created.id)!.deliveries, { pending: 0, delivered: 0, failed: 1 });
      assert.equal(logs.filter((l) => l.includes('webhook delivery failed')).length, 3);
      assert.ok(logs.some((l) => l.includes('no attempts left') && l.includes(created.id)));
      for (const l of logs) {
        assert.ok(!l.includes(created.secret), `secret in a log line: ${l}`);
        assert.ok(!l.includes('receiver-token'), 'the query string is not logged');
      }
      // Nothing further is tried.
      await d.runOnce();
      assert.equal((await listDeliveries(store, { webhook: created.id }))[0]!.attempts, 3);
      // The receiver comes back on the same port; retry sends it at once.
      const back = await startReceiver({ port, secret: created.secret });
      try {
        const again = await retryDelivery(store, failed!.id);
        assert.deepEqual([again.status, again.attempts], ['pending', 0]);
        const patient = dispatcher({ backoffMs: [50, 100, 200, 400], timeoutMs: 5000 });
        await back.waitFor((rs) => rs.length >= 1, 15_000, () => patient.runOnce()).catch(async (err: Error) => {
          throw new Error(`${err.message}; deliveries: ${JSON.stringify(await listDeliveries(store, { webhook: created.id }))}; logs: ${logs.slice(-3).join(' | ')}`);
        });
        assert.equal(back.requests[0]!.signatureOk, true);
        const [done] = await listDeliveries(store, { webhook: created.id });
        assert.deepEqual([done!.status, done!.attempts, done!.lastStatus], ['delivered', 1, 200]);
      } finally {
        await back.close();
      }
      await assert.rejects(retryDelivery(store, 999_999_999), hasCode('NOT_FOUND'));
      await disableWebhook(store, created.id, ACTOR);
    });

    await t.test('the cursor: a restart, a second process, two dispatchers at once deliver nothing twice', async () => {
      const h = await hook(['issued']);
      const { batch } = await batchOf();
      for (let i = 0; i < 3; i++) await issue(await device(batch));
      const first = dispatcher();
      await h.receiver.waitFor((rs) => rs.length >= 3, 10_000, () => first.runOnce());
      await first.stop();
      // A restart: a new dispatcher on a new connection to the same store.
      const other = await target.openStore();
      const restarted = dispatcher({}, other);
      await restarted.runOnce();
      assert.equal(h.receiver.requests.length, 3);
      // Two processes at once on new events.
      for (let i = 0; i < 4; i++) await issue(await device(batch));
      const twin = dispatcher({}, await target.openStore());
      const created = await Promise.all([restarted.collect(), twin.collect()]);
      assert.equal(created[0] + created[1], 4);
      await Promise.all([restarted.send(), twin.send()]);
      await h.receiver.waitFor((rs) => rs.length >= 7, 10_000, () => Promise.all([restarted.runOnce(), twin.runOnce()]));
      await new Promise((resolve) => setTimeout(resolve, 100));
      await Promise.all([restarted.runOnce(), twin.runOnce()]);
      assert.equal(h.receiver.requests.length, 7);
      assert.equal(new Set(h.receiver.requests.map((x) => x.body.id)).size, 7);
      assert.equal((await listDeliveries(store, { webhook: h.id })).length, 7);
      // No cursor at all (a store that never ran a dispatcher): the first run starts at the head.
      await store.db.deleteFrom('cursors').where('name', '=', AUDIT_CURSOR).execute();
      await issue(await device(batch));
      await restarted.runOnce();
      assert.ok(await store.db.selectFrom('cursors').select('value').where('name', '=', AUDIT_CURSOR).executeTakeFirst());
      await issue(await device(batch));
      await h.receiver.waitFor((rs) => rs.length >= 8, 10_000, () => restarted.runOnce());
      await restarted.runOnce();
      assert.equal(h.receiver.requests.length, 8, 'the entry before the cursor existed is not replayed');
      await disableWebhook(store, h.id, ACTOR);
    });

    await t.test('expiring: valid device certificates within N days, announced once per certificate and webhook', async () => {
      const h = await hook(['expiring']);
      const d = dispatcher({ expiringWithinDays: 7 });
      const short = await batchOf(20, 'shortlived');
      const long = await batchOf(20, 'quarterly');
      const s1 = await device(short.batch);
      const serial1 = await issue(s1);
      const revokedSerial = await issue(await device(short.batch));
      await authority.revoke({ serial: revokedSerial }, 'unspecified', ACTOR);
      const serialLong = await issue(await device(long.batch));
      assert.equal(await d.scanExpiring({ force: true }), 1);
      await h.receiver.waitFor((rs) => rs.length >= 1, 10_000, () => d.send());
      const [notice] = h.receiver.requests;
      assert.equal(notice!.signatureOk, true);
      assert.equal(notice!.headers['hallmark-event'], 'expiring');
      assert.equal(notice!.body.id, `exp_issuing-1_${serial1}`);
      const data = notice!.body.data;
      assert.deepEqual([data.serial, data.device, data.product, data.line, data.batch, data.issuer], [serial1, s1.udid, 'shortlived', short.line, short.batch, 'issuing-1']);
      assert.ok(Number(data.daysLeft) <= 1);
      assert.ok(Date.parse(String(data.notAfter)) - Date.now() < 2 * 86400e3);
      // Announced once.
      assert.equal(await d.scanExpiring({ force: true }), 0);
      // A certificate recorded after the scan is new, even though it expires inside the window already announced.
      const serial2 = await issue(await device(short.batch));
      assert.equal(await d.scanExpiring({ force: true }), 1);
      // Not forced: the scan is not due again yet.
      await issue(await device(short.batch));
      assert.equal(await d.scanExpiring(), 0);
      // 85 days on, the 90-day certificate enters the window (the 1-day ones have expired).
      assert.equal(await d.scanExpiring({ force: true, now: new Date(Date.now() + 85 * 86400e3) }), 1);
      await h.receiver.waitFor((rs) => rs.length >= 3, 10_000, () => d.send());
      assert.deepEqual(h.receiver.requests.map((x) => x.body.data.serial).sort(), [serial1, serial2, serialLong].sort());
      assert.ok(!h.receiver.requests.some((x) => x.body.data.serial === revokedSerial));
      // Another webhook has its own memory: it hears of the certificates expiring now.
      const h2 = await hook(['expiring']);
      assert.equal(await d.scanExpiring({ force: true }), 3);
      await h2.receiver.waitFor((rs) => rs.length >= 3, 10_000, () => d.send());
      assert.equal(h.receiver.requests.length, 3);
      await disableWebhook(store, h.id, ACTOR);
      await disableWebhook(store, h2.id, ACTOR);
    });
  } finally {
    for (const r of receivers) await r.close();
    await authority.close();
  }
}, { timeout: 180_000 });
