// The expiry report: valid certificates expiring within a window, device certificates grouped by
// product / line / batch, the others apart, counts per ISO week. Revoked and expired certificates and CA
// certificates are left out. On SQLite and PostgreSQL.

import assert from 'node:assert/strict';
import { createHash, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { Authority } from '../../src/authority/authority.js';
import { expiryReport, isoWeekStart } from '../../src/authority/expiry.js';
import { initAuthority } from '../../src/authority/init.js';
import { HallmarkError } from '../../src/errors.js';
import { createCsr } from '../../src/pki/csr.js';
import { encodeNameString } from '../../src/pki/names.js';
import { encodePem } from '../../src/pki/pem.js';
import { forEachDialect, type StoreTarget, withDatabaseUrl } from '../helpers/db.js';

const PASSPHRASE = 'expiry test passphrase';
const ACTOR = 'cli:test';
const DAY = 86400e3;

interface DeviceKey { readonly privateKey: KeyObject; readonly spki: Buffer; readonly udid: string }
function newKey(): DeviceKey {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const spki = publicKey.export({ type: 'spki', format: 'der' });
  return { privateKey, spki, udid: createHash('sha256').update(spki).digest('hex') };
}
const csrOf = (key: { privateKey: KeyObject }): string => encodePem('CERTIFICATE REQUEST', createCsr({ subject: encodeNameString('CN=x'), privateKey: key.privateKey }));

test('isoWeekStart: the Monday (UTC) of the ISO week', () => {
  assert.equal(isoWeekStart(new Date('2024-01-01T00:00:00Z')), '2024-01-01'); // a Monday
  assert.equal(isoWeekStart(new Date('2024-01-07T23:59:59Z')), '2024-01-01'); // its Sunday
  assert.equal(isoWeekStart(new Date('2024-01-08T00:00:00Z')), '2024-01-08');
  assert.equal(isoWeekStart(new Date('2024-03-01T12:00:00Z')), '2024-02-26'); // across a month (leap year)
  assert.equal(isoWeekStart(new Date('2021-01-03T10:00:00Z')), '2020-12-28'); // across a year
});

forEachDialect('expiry report', async (t: TestContext, target: StoreTarget) => {
  const home = join(target.dir, 'home');
  await withDatabaseUrl(target.url, () => initAuthority({ home, rootDir: join(target.dir, 'root'), org: 'Acme', passphrase: PASSPHRASE, keyBackend: 'file', actor: ACTOR }));
  const authority = await Authority.open(home, PASSPHRASE, await target.openStore());
  const registry = authority.registry;
  try {
    await registry.createProduct({ name: 'sensor', validityDays: 1, actor: ACTOR });
    await registry.createProduct({ name: 'lamp', validityDays: 5, actor: ACTOR });
    await registry.createProduct({ name: 'meter', validityDays: 90, actor: ACTOR });
    await registry.createLine({ name: 'line-a', ca: 'issuing-1', actor: ACTOR });
    await registry.createLine({ name: 'line-b', ca: 'issuing-1', actor: ACTOR });
    const sensors = await registry.createBatch({ product: 'sensor', line: 'line-a', quota: 10, actor: ACTOR });
    const lamps = await registry.createBatch({ product: 'lamp', line: 'line-b', quota: 10, actor: ACTOR });
    const meters = await registry.createBatch({ product: 'meter', line: 'line-a', quota: 10, actor: ACTOR });
    const issueIn = async (batch: string, serialNumber?: string) => {
      const key = newKey();
      await registry.registerDevice(batch, { publicKeySpki: key.spki, serialNumber }, ACTOR);
      return { udid: key.udid, serial: (await authority.issueForDevice({ udid: key.udid, csr: csrOf(key), actor: ACTOR })).serial };
    };
    const s1 = await issueIn(sensors, 'SN-1');
    const s2 = await issueIn(sensors, 'SN-2');
    const revoked = await issueIn(sensors, 'SN-3');
    await authority.revoke({ serial: revoked.serial }, 'keyCompromise', ACTOR);
    const lamp = await issueIn(lamps);
    const meter = await issueIn(meters);
    const tls = await authority.issue({ csr: csrOf(generateKeyPairSync('ec', { namedCurve: 'P-256' })), profile: 'tls-server', altNames: { dns: ['broker.acme.test'] }, subject: 'CN=broker.acme.test', validityDays: 3, actor: ACTOR });

    await t.test('within 7 days: devices grouped by product / line / batch, others apart, weeks counted', async () => {
      const now = new Date();
      const r = await expiryReport(authority.store, { within: '7d', now });
      assert.equal(r.within, '7d');
      assert.equal(r.until, new Date(now.getTime() + 7 * DAY).toISOString());
      assert.deepEqual([r.total, r.devices, r.others, r.truncated], [4, 3, 1, false]);
      assert.deepEqual(r.groups.map((g) => [g.product, g.line, g.batch, g.count]), [['sensor', 'line-a', sensors, 2], ['lamp', 'line-b', lamps, 1]]);
      const [sensorGroup] = r.groups;
      assert.deepEqual(sensorGroup!.certificates.map((c) => c.serial).sort(), [s1.serial, s2.serial].sort());
      const c1 = sensorGroup!.certificates.find((c) => c.serial === s1.serial)!;
      assert.deepEqual([c1.device, c1.serialNumber, c1.deviceState, c1.issuer, c1.profile, c1.tenant], [s1.udid, 'SN-1', 'provisioned', 'issuing-1', 'device', 'default']);
      assert.ok(c1.daysLeft <= 1);
      assert.equal(sensorGroup!.earliest, sensorGroup!.certificates[0]!.notAfter);
      assert.equal(r.groups[1]!.certificates[0]!.device, lamp.udid);
      assert.deepEqual(r.otherCertificates.map((c) => [c.serial, c.profile, c.subject]), [[tls.serial, 'tls-server', 'CN=broker.acme.test']]);
      assert.ok(!JSON.stringify(r).includes(revoked.serial), 'revoked certificates are left out');
      assert.ok(!JSON.stringify(r).includes(meter.serial), 'outside the window');
      // Weeks: from this week's Monday to the week of the end of the window, every week once, zeros included.
      assert.equal(r.weeks[0]!.week, isoWeekStart(now));
      assert.equal(r.weeks.at(-1)!.week, isoWeekStart(new Date(now.getTime() + 7 * DAY)));
      for (let i = 1; i < r.weeks.length; i++) assert.equal(Date.parse(r.weeks[i]!.week) - Date.parse(r.weeks[i - 1]!.week), 7 * DAY);
      for (const w of r.weeks) {
        assert.equal(new Date(w.week).getUTCDay(), 1, 'a Monday');
        assert.equal(w.total, w.devices + w.others);
      }
      assert.equal(r.weeks.reduce((n, w) => n + w.devices, 0), 3);
      assert.equal(r.weeks.reduce((n, w) => n + w.others, 0), 1);
      const inWeekOf = (iso: string) => r.weeks.find((w) => w.week === isoWeekStart(new Date(iso)))!;
      assert.ok(inWeekOf(c1.notAfter).devices >= 1);
    });

    await t.test('a wider window takes in the 90-day certificates; an expired certificate is no longer listed', async () => {
      const wide = await expiryReport(authority.store, { within: '100d' });
      assert.deepEqual([wide.devices, wide.others], [4, 1]);
      assert.ok(wide.groups.some((g) => g.product === 'meter' && g.batch === meters && g.certificates[0]!.serial === meter.serial));
      assert.ok(wide.weeks.length >= 14 && wide.weeks.length <= 16);
      // Two days on, the one-day sensor certificates have expired.
      const later = await expiryReport(authority.store, { within: '7d', now: new Date(Date.now() + 2 * DAY) });
      assert.deepEqual(later.groups.map((g) => g.product), ['lamp']);
      assert.deepEqual([later.devices, later.others], [1, 1]);
    });

    await t.test('limit caps the listing, never the counts; a bad window is refused', async () => {
      const capped = await expiryReport(authority.store, { within: '7d', limit: 1 });
      assert.equal(capped.truncated, true);
      assert.equal(capped.total, 4);
      assert.deepEqual(capped.groups.map((g) => g.count), [2, 1]);
      assert.equal(capped.groups.reduce((n, g) => n + g.certificates.length, 0) + capped.otherCertificates.length, 1);
      for (const within of ['soon', '7', '-1d', '6y']) {
        await assert.rejects(expiryReport(authority.store, { within }), (err: unknown) => err instanceof HallmarkError && err.code === 'BAD_DURATION', within);
      }
    });
  } finally {
    await authority.close();
  }
});
