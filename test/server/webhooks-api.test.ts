// Webhooks and the expiry report through a running server: the admin API (scopes, create with the secret
// shown once, list with counts, deliveries, retry, disable, GET /api/v1/expiry), the dispatcher started by
// startServers delivering to a real receiver (events made in this process and by a `hallmark` process),
// and the `hallmark webhook …` / `hallmark expiry` commands end to end. The secret never reaches the log.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { promisify } from 'node:util';
import { Authority } from '../../src/authority/authority.js';
import { isoWeekStart } from '../../src/authority/expiry.js';
import { createToken } from '../../src/authority/tokens.js';
import { createLogger } from '../../src/log.js';
import { createCsr } from '../../src/pki/csr.js';
import { encodeNameString } from '../../src/pki/names.js';
import { encodePem } from '../../src/pki/pem.js';
import { startServers, type RunningServers } from '../../src/server/servers.js';
import { createTestAuthority, type TestAuthority } from '../helpers/authority.js';
import { call } from '../helpers/http.js';
import { deadPort, startReceiver, type Receiver } from '../events/receiver.js';
import { verifySignature } from '../../src/events/webhooks.js';

const execFileAsync = promisify(execFile);
const BIN = join(import.meta.dirname, '..', '..', '..', 'bin', 'hallmark.js');

interface DeviceKey { readonly privateKey: KeyObject; readonly spki: Buffer; readonly udid: string }
function newKey(): DeviceKey {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const spki = publicKey.export({ type: 'spki', format: 'der' });
  return { privateKey, spki, udid: createHash('sha256').update(spki).digest('hex') };
}
const csrOf = (key: DeviceKey): string => encodePem('CERTIFICATE REQUEST', createCsr({ subject: encodeNameString('CN=x'), privateKey: key.privateKey }));

describe('webhooks and expiry: admin API, dispatcher in the server, CLI', () => {
  let t: TestAuthority;
  let authority: Authority;
  let servers: RunningServers;
  let ca: string;
  let writer: string;
  let reader: string;
  let certReader: string;
  let receiver: Receiver;
  let shortBatch: string;
  let meterBatch: string;
  let log = '';
  const secrets: string[] = [];

  /** Runs `hallmark …` in another process (asynchronously: the server runs in this one). */
  async function hallmark(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
    try {
      const r = await execFileAsync(process.execPath, [BIN, ...args, '--home', t.home], { env: { ...process.env, HALLMARK_PASSPHRASE: t.passphrase, HALLMARK_DATABASE_URL: '' }, timeout: 60_000 });
      return { code: 0, stdout: r.stdout, stderr: r.stderr };
    } catch (err) {
      const e = err as { code?: number; stdout?: string; stderr?: string };
      return { code: typeof e.code === 'number' ? e.code : -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
    }
  }
  const issueIn = async (batch: string): Promise<{ udid: string; serial: string }> => {
    const key = newKey();
    await authority.registry.registerDevice(batch, { publicKeySpki: key.spki }, 'test');
    return { udid: key.udid, serial: (await authority.issueForDevice({ udid: key.udid, csr: csrOf(key), actor: 'test' })).serial };
  };
  const api = (path: string, options: Parameters<typeof call>[1] = {}) => call(`${servers.httpsUrl}${path}`, { ca, ...options });

  before(async () => {
    t = await createTestAuthority();
    authority = await Authority.open(t.home, t.passphrase);
    const sink = new Writable({ write(chunk: Buffer, _enc, done) { log += chunk.toString(); done(); } });
    servers = await startServers(authority, {
      host: '127.0.0.1', httpsPort: 0, httpPort: 0, logger: createLogger(sink),
      webhooks: { pollMs: 50, backoffMs: [50, 50], timeoutMs: 3000, expiringScanMs: 300, expiringWithinDays: 7 },
    });
    ca = readFileSync(t.rootPem, 'utf8');
    writer = (await createToken(authority.store, { scopes: ['webhooks:write', 'webhooks:read'], actor: 'test' })).token;
    reader = (await createToken(authority.store, { scopes: ['webhooks:read'], actor: 'test' })).token;
    certReader = (await createToken(authority.store, { scopes: ['certificates:read'], actor: 'test' })).token;
    receiver = await startReceiver();
    await authority.registry.createProduct({ name: 'tag', validityDays: 1, actor: 'test' });
    await authority.registry.createProduct({ name: 'meter', actor: 'test' });
    await authority.registry.createLine({ name: 'l1', ca: 'issuing-1', actor: 'test' });
    shortBatch = await authority.registry.createBatch({ product: 'tag', line: 'l1', quota: 50, actor: 'test' });
    meterBatch = await authority.registry.createBatch({ product: 'meter', line: 'l1', quota: 50, actor: 'test' });
  });

  after(async () => {
    await servers?.close();
    await receiver?.close();
    await authority?.close();
    await t?.cleanup();
  });

  let hookId: string;

  test('POST /api/v1/webhooks: scopes, checks, the secret once (no-store); GET lists without secrets', async () => {
    assert.equal((await api('/api/v1/webhooks', { method: 'POST', body: { url: receiver.url, events: ['issued'] } })).status, 401);
    assert.equal((await api('/api/v1/webhooks', { method: 'POST', token: reader, body: { url: receiver.url, events: ['issued'] } })).status, 403);
    assert.equal((await api('/api/v1/webhooks', { method: 'POST', token: certReader, body: { url: receiver.url, events: ['issued'] } })).status, 403);
    for (const body of [{ url: receiver.url, events: ['exploded'] }, { url: receiver.url, events: [] }, { url: 'ftp://x/', events: ['issued'] }, { url: receiver.url }, { url: receiver.url, events: ['issued'], extra: 1 }]) {
      const r = await api('/api/v1/webhooks', { method: 'POST', token: writer, body });
      assert.equal(r.status, 400, `${JSON.stringify(body)}: ${r.body}`);
      assert.equal(JSON.parse(r.body).error.code, 'BAD_REQUEST');
    }
    const r = await api('/api/v1/webhooks', { method: 'POST', token: writer, body: { url: receiver.url, events: ['revoked', 'issued'] } });
    assert.equal(r.status, 201, r.body);
    assert.equal(r.headers['cache-control'], 'no-store');
    const created = JSON.parse(r.body) as { id: string; secret: string; events: string[]; url: string };
    assert.match(created.id, /^wh_[0-9a-f]{16}$/);
    assert.match(created.secret, /^whsec_/);
    assert.deepEqual(created.events, ['issued', 'revoked']);
    hookId = created.id;
    receiver.secret = created.secret;
    secrets.push(created.secret);
    const list = await api('/api/v1/webhooks', { token: reader });
    assert.equal(list.status, 200);
    assert.ok(!list.body.includes(created.secret));
    const item = (JSON.parse(list.body).items as Array<Record<string, unknown>>).find((w) => w.id === hookId)!;
    assert.deepEqual([item.url, item.status, item.events, item.deliveries], [receiver.url, 'active', ['issued', 'revoked'], { pending: 0, delivered: 0, failed: 0 }]);
    assert.equal((await api('/api/v1/webhooks', { token: certReader })).status, 403);
  });

  test('the server delivers events made in this process and by another (hallmark revoke); deliveries are listed', async () => {
    const d = await issueIn(meterBatch);
    await receiver.waitFor((rs) => rs.some((x) => x.body.event === 'issued' && x.body.data.serial === d.serial));
    const revoked = await hallmark('revoke', '--serial', d.serial, '--reason', 'keyCompromise');
    assert.equal(revoked.code, 0, revoked.stderr);
    await receiver.waitFor((rs) => rs.some((x) => x.body.event === 'revoked' && x.body.data.serial === d.serial));
    const revokedEvent = receiver.of('revoked').find((x) => x.body.data.serial === d.serial)!;
    assert.equal(revokedEvent.signatureOk, true);
    assert.equal(revokedEvent.body.data.reason, 'keyCompromise');
    assert.match(String(revokedEvent.body.data.actor), /^cli:/);
    assert.ok(receiver.requests.every((x) => x.signatureOk === true));
    const r = await api(`/api/v1/webhooks/${hookId}/deliveries`, { token: reader });
    assert.equal(r.status, 200, r.body);
    const items = JSON.parse(r.body).items as Array<{ id: number; event: string; status: string; attempts: number; lastStatus: number; payload: { data: { serial: string } } }>;
    assert.deepEqual(items.map((i) => [i.event, i.status, i.attempts, i.lastStatus, i.payload.data.serial]), [['revoked', 'delivered', 1, 200, d.serial], ['issued', 'delivered', 1, 200, d.serial]]);
    assert.equal((await api(`/api/v1/webhooks/${hookId}/deliveries?status=failed`, { token: reader })).body, '{"items":[]}');
    assert.equal((await api('/api/v1/webhooks/wh_0000000000000000/deliveries', { token: reader })).status, 404);
    assert.equal((await api('/api/v1/webhooks/nope/deliveries', { token: reader })).status, 400);
  });

  test('a delivery that failed every attempt is listed as failed; retry through the API delivers it', async () => {
    receiver.answers = [500, 503, 502];
    const d = await issueIn(meterBatch);
    const failedOne = async () => {
      const r = await api(`/api/v1/webhooks/${hookId}/deliveries?status=failed`, { token: reader });
      return (JSON.parse(r.body).items as Array<{ id: number; attempts: number; lastStatus: number; lastError: string; payload: { data: { serial: string } } }>)[0];
    };
    const deadline = Date.now() + 10_000;
    while (!(await failedOne())) {
      assert.ok(Date.now() < deadline, 'the delivery did not fail in time');
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    const failed = (await failedOne())!;
    assert.deepEqual([failed.attempts, failed.lastStatus, failed.payload.data.serial], [3, 502, d.serial]);
    assert.match(failed.lastError, /^HTTP 502/);
    assert.match(log, /webhook delivery failed: no attempts left/);
    const list = JSON.parse((await api('/api/v1/webhooks', { token: reader })).body).items as Array<{ id: string; deliveries: Record<string, number> }>;
    assert.equal(list.find((w) => w.id === hookId)!.deliveries.failed, 1);
    assert.equal((await api(`/api/v1/webhooks/${hookId}/deliveries/${failed.id}/retry`, { method: 'POST', token: reader })).status, 403);
    assert.equal((await api(`/api/v1/webhooks/${hookId}/deliveries/999999/retry`, { method: 'POST', token: writer })).status, 404);
    const retried = await api(`/api/v1/webhooks/${hookId}/deliveries/${failed.id}/retry`, { method: 'POST', token: writer });
    assert.equal(retried.status, 200, retried.body);
    assert.equal(JSON.parse(retried.body).status, 'pending');
    await receiver.waitFor((rs) => rs.some((x) => x.answered === 200 && x.body.data.serial === d.serial));
    assert.equal(receiver.requests.filter((x) => x.body.data.serial === d.serial).length, 4);
  });

  test('GET /api/v1/expiry (certificates:read): groups, others, weeks', async () => {
    const tag = await issueIn(shortBatch);
    assert.equal((await api('/api/v1/expiry?within=7d', { token: reader })).status, 403);
    assert.equal((await api('/api/v1/expiry?within=soon', { token: certReader })).status, 400);
    const r = await api('/api/v1/expiry?within=7d', { token: certReader });
    assert.equal(r.status, 200, r.body);
    const report = JSON.parse(r.body) as { total: number; devices: number; within: string; groups: Array<{ product: string; line: string; batch: string; count: number; certificates: Array<{ serial: string; device: string }> }>; otherCertificates: unknown[]; weeks: Array<{ week: string; total: number }> };
    assert.equal(report.within, '7d');
    assert.deepEqual(report.groups.map((g) => [g.product, g.line, g.batch, g.count]), [['tag', 'l1', shortBatch, 1]]);
    assert.deepEqual([report.groups[0]!.certificates[0]!.serial, report.groups[0]!.certificates[0]!.device], [tag.serial, tag.udid]);
    assert.deepEqual(report.otherCertificates, []);
    assert.equal(report.weeks[0]!.week, isoWeekStart(new Date()));
    assert.equal(report.weeks.reduce((n, w) => n + w.total, 0), report.total);
    const wide = JSON.parse((await api('/api/v1/expiry?within=400d', { token: certReader })).body) as typeof report;
    assert.ok(wide.devices >= 2);
    assert.ok(wide.otherCertificates.length >= 2, 'the TLS server and OCSP signer certificates of init');
  });

  test('hallmark webhook add / list / deliveries / retry / disable and hallmark expiry, end to end', async () => {
    const second = await startReceiver();
    try {
      const add = await hallmark('webhook', 'add', second.url, '--events', 'issued,expiring', '--json');
      assert.equal(add.code, 0, add.stderr);
      const created = JSON.parse(add.stdout) as { id: string; secret: string; events: string[] };
      assert.deepEqual(created.events, ['issued', 'expiring']);
      second.secret = created.secret;
      secrets.push(created.secret);
      assert.match(add.stderr, /not shown again/);
      const text = await hallmark('webhook', 'add', second.url, '--events', 'revoked');
      assert.equal(text.code, 0, text.stderr);
      assert.match(text.stdout, /^id: wh_[0-9a-f]{16}\nsecret: whsec_\S+\n$/);
      secrets.push(/secret: (\S+)/.exec(text.stdout)![1]!);
      const bad = await hallmark('webhook', 'add', second.url, '--events', 'exploded');
      assert.equal(bad.code, 1);
      assert.match(bad.stderr, /unknown event "exploded".*\[BAD_REQUEST\]/);

      // A short-lived certificate: issued at once, expiring within the 7 days the server scans for.
      const tag = await issueIn(shortBatch);
      await second.waitFor((rs) => rs.some((x) => x.body.event === 'issued' && x.body.data.serial === tag.serial) && rs.some((x) => x.body.event === 'expiring' && x.body.data.serial === tag.serial));
      // Verified now, with the secret the CLI printed: a delivery may arrive before the test has read it
      // (the expiring scan runs as soon as the webhook exists), when the receiver could not check it yet.
      assert.ok(second.requests.every((x) => verifySignature(created.secret, x.raw, x.headers['hallmark-signature'] as string | undefined)));
      const expiring = second.of('expiring').find((x) => x.body.data.serial === tag.serial)!;
      assert.deepEqual([expiring.body.data.product, expiring.body.data.batch, expiring.body.data.device], ['tag', shortBatch, tag.udid]);

      const list = await hallmark('webhook', 'list', '--json');
      assert.equal(list.code, 0, list.stderr);
      const hooks = JSON.parse(list.stdout) as Array<{ id: string; deliveries: Record<string, number>; status: string }>;
      const mine = hooks.find((h) => h.id === created.id)!;
      assert.equal(mine.status, 'active');
      assert.ok(mine.deliveries.delivered >= 2);
      assert.ok(!list.stdout.includes(created.secret));
      const table = await hallmark('webhook', 'list');
      assert.match(table.stdout, /^ID\s+STATUS\s+URL\s+EVENTS\s+PENDING\s+DELIVERED\s+FAILED/);
      assert.match(table.stdout, new RegExp(`${created.id}\\s+active\\s+\\S+\\s+issued,expiring`));

      const deliveries = await hallmark('webhook', 'deliveries', '--webhook', created.id, '--json');
      assert.equal(deliveries.code, 0, deliveries.stderr);
      const rows = JSON.parse(deliveries.stdout) as Array<{ id: number; event: string; status: string }>;
      assert.ok(rows.some((d) => d.event === 'expiring' && d.status === 'delivered'));
      // A receiver that is down: its delivery ends failed after the configured attempts, visible in `deliveries`.
      const down = await hallmark('webhook', 'add', `http://127.0.0.1:${await deadPort()}/gone`, '--events', 'issued', '--json');
      assert.equal(down.code, 0, down.stderr);
      const downHook = JSON.parse(down.stdout) as { id: string; secret: string };
      secrets.push(downHook.secret);
      await issueIn(meterBatch);
      const failedDeadline = Date.now() + 15_000;
      let failedText;
      for (;;) {
        failedText = await hallmark('webhook', 'deliveries', '--webhook', downHook.id, '--status', 'failed', '--limit', '5');
        assert.equal(failedText.code, 0, failedText.stderr);
        if (failedText.stdout.includes('ECONNREFUSED')) break;
        assert.ok(Date.now() < failedDeadline, `not failed in time: ${(await hallmark('webhook', 'deliveries', '--webhook', downHook.id)).stdout}`);
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
      assert.match(failedText.stdout, new RegExp(`^\\d+\\s+${downHook.id}\\s+issued\\s+failed\\s+3\\s+-\\s+-`, 'm'));
      assert.equal((await hallmark('webhook', 'disable', downHook.id)).code, 0);
      assert.equal((await hallmark('webhook', 'deliveries', '--status', 'lost')).code, 1);

      const before = second.requests.length;
      const retry = await hallmark('webhook', 'retry', String(rows[0]!.id));
      assert.equal(retry.code, 0, retry.stderr);
      assert.match(retry.stdout, /pending again/);
      await second.waitFor((rs) => rs.length > before);
      assert.equal((await hallmark('webhook', 'retry', 'x')).code, 1);

      const disable = await hallmark('webhook', 'disable', created.id);
      assert.equal(disable.code, 0, disable.stderr);
      const again = await hallmark('webhook', 'disable', created.id);
      assert.equal(again.code, 1);
      assert.match(again.stderr, /\[ILLEGAL_TRANSITION\]/);
      const quiet = second.requests.length;
      await issueIn(shortBatch);
      await new Promise((resolve) => setTimeout(resolve, 400));
      assert.equal(second.requests.filter((x) => x.body.event === 'issued').length, second.requests.slice(0, quiet).filter((x) => x.body.event === 'issued').length, 'a disabled webhook gets nothing');

      const expiry = await hallmark('expiry', '--within', '7d', '--json');
      assert.equal(expiry.code, 0, expiry.stderr);
      const report = JSON.parse(expiry.stdout) as { groups: Array<{ product: string; count: number }>; weeks: unknown[] };
      assert.ok(report.groups.find((g) => g.product === 'tag')!.count >= 2);
      assert.ok(report.weeks.length >= 2);
      const expiryText = await hallmark('expiry', '--within', '7d');
      assert.equal(expiryText.code, 0, expiryText.stderr);
      assert.match(expiryText.stdout, /valid certificate\(s\) expire within 7d/);
      assert.match(expiryText.stdout, new RegExp(`tag\\s+l1\\s+${shortBatch}\\s+\\d+`));
      assert.match(expiryText.stdout, /Per week \(Monday, UTC\):\nWEEK\s+DEVICES\s+OTHERS\s+TOTAL/);
      const badWithin = await hallmark('expiry', '--within', 'soon');
      assert.equal(badWithin.code, 1);
      assert.match(badWithin.stderr, /\[BAD_DURATION\]/);
    } finally {
      await second.close();
    }
  });

  test('disable through the API; the secrets never reached the server log', async () => {
    const r = await api(`/api/v1/webhooks/${hookId}/disable`, { method: 'POST', token: writer });
    assert.equal(r.status, 200, r.body);
    assert.equal(JSON.parse(r.body).status, 'disabled');
    assert.equal((await api(`/api/v1/webhooks/${hookId}/disable`, { method: 'POST', token: writer })).status, 409);
    assert.ok(log.length > 0);
    assert.ok(secrets.length >= 3);
    for (const s of secrets) assert.ok(!log.includes(s), 'a webhook secret is in the server log');
  });
});
