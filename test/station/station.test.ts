// The offline station through its library API, with the station key in a SoftHSM2 token.

import assert from 'node:assert/strict';
import { generateKeyPairSync, verify as nodeVerify, createPublicKey } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test, type TestContext } from 'node:test';
import { HallmarkError } from '../../src/errors.js';
import { SCHEME_BY_OID } from '../../src/pki/algorithms.js';
import { parseCertificate } from '../../src/pki/certificate.js';
import { createCsr } from '../../src/pki/csr.js';
import { EXT } from '../../src/pki/extensions.js';
import { encodeNameString, nameToString } from '../../src/pki/names.js';
import { encodePem } from '../../src/pki/pem.js';
import { verifyJournal } from '../../src/station/journal.js';
import { keySha256 } from '../../src/station/package.js';
import { Station, exportJournal, initStation, signCsrs, stationStatus, type SignOutcome } from '../../src/station/station.js';
import { softHsmAvailable } from '../helpers/softhsm.js';
import { makeTempDirSync } from '../helpers/tmp.js';
import { BASE, createStationToken, deviceCsr, makePackage, makeRoot, type StationToken, type TestCa } from './fixtures.js';

const available = softHsmAvailable();
const skip = !available && process.env.CI !== 'true' ? 'softhsm2 not installed: apt-get install softhsm2' : false;

const code = (c: string, re?: RegExp) => (err: unknown): boolean => {
  assert.ok(err instanceof HallmarkError, `expected a HallmarkError, got ${String(err)}`);
  assert.equal(err.code, c, err.message);
  if (re) assert.match(err.message, re);
  return true;
};

const refusedWith = (o: SignOutcome | undefined, c: string, re?: RegExp): void => {
  assert.ok(o && !o.ok, `expected a refusal, got ${JSON.stringify(o)}`);
  assert.equal(o.error.code, c, o.error.message);
  if (re) assert.match(o.error.message, re);
};

function rsaCsr(): string {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return encodePem('CERTIFICATE REQUEST', createCsr({ subject: encodeNameString('CN=rsa'), privateKey }));
}

function p192Csr(): string {
  // node's createCsr names no scheme for P-192; openssl makes one.
  const dir = makeTempDirSync();
  execFileSync('openssl', ['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime192v1', '-nodes', '-keyout', join(dir, 'k'), '-subj', '/CN=p192', '-out', join(dir, 'c')], { stdio: 'ignore' });
  return execFileSync('cat', [join(dir, 'c')], { encoding: 'utf8' });
}

describe('offline station (SoftHSM2)', { skip }, () => {
  let tok: StationToken;
  let other: StationToken;
  let root: TestCa;

  before(async () => {
    assert.ok(available, 'softhsm2 is required under CI=true');
    // Tokens first: SoftHSM2 sees tokens created while the module is loaded only after it is released.
    tok = await createStationToken('station-lib');
    other = await createStationToken('station-other');
    root = makeRoot();
  });
  after(async () => {
    await tok?.token.cleanup();
    await other?.token.cleanup();
  });

  async function station(t: TestContext, manifest: Record<string, unknown> = {}, cert: Record<string, unknown> = {}): Promise<{ dir: string; pkgDir: string }> {
    const base = makeTempDirSync('hallmark-station-');
    const pkgDir = join(base, 'package');
    await makePackage(pkgDir, { stationSpki: tok.spki, root, manifest: { keyUri: tok.keyUri, ...manifest }, cert });
    const dir = join(base, 'station');
    await initStation({ dir, packageDir: pkgDir, pin: tok.token.pin, module: tok.token.module });
    void t;
    return { dir, pkgDir };
  }

  test('init refuses a wrong PIN, another token\'s key and a used directory; writes nothing then', async (t) => {
    const base = makeTempDirSync('hallmark-station-');
    const pkgDir = join(base, 'package');
    await makePackage(pkgDir, { stationSpki: tok.spki, root, manifest: { keyUri: tok.keyUri } });
    const dir = join(base, 'station');
    await assert.rejects(initStation({ dir, packageDir: pkgDir, pin: '000000', module: tok.token.module }), code('BAD_PASSPHRASE', /wrong PIN/));
    assert.ok(!existsSync(dir), 'nothing written after a wrong PIN');
    // The package names the key of another token: that key is not station.pem's.
    await assert.rejects(initStation({ dir, packageDir: pkgDir, keyUri: other.keyUri, pin: other.token.pin, module: tok.token.module }), code('STATION_KEY_MISMATCH'));
    assert.ok(!existsSync(dir));
    await assert.rejects(initStation({ dir, packageDir: pkgDir, keyUri: tok.keyUri.replace(/id=[^;]+/, 'id=%01'), pin: tok.token.pin, module: tok.token.module }), code('STATION_KEY_MISMATCH', /does not hold the station key/));
    await assert.rejects(initStation({ dir, packageDir: pkgDir, pin: tok.token.pin }), (e: unknown) => e instanceof HallmarkError && /--module/.test(e.message) || (process.env.HALLMARK_PKCS11_MODULE !== undefined));
    const s = await initStation({ dir, packageDir: pkgDir, pin: tok.token.pin, module: tok.token.module });
    assert.equal(s.issued, 0);
    assert.equal(s.left, 10);
    assert.deepEqual(readdirSync(dir).sort(), ['chain.pem', 'journal.jsonl', 'station-config.json', 'station.json', 'station.pem']);
    assert.ok(!(await readFile(join(dir, 'station-config.json'), 'utf8')).includes(tok.token.pin), 'the PIN is never stored');
    await assert.rejects(initStation({ dir, packageDir: pkgDir, pin: tok.token.pin, module: tok.token.module }), code('STATION_ALREADY_INITIALISED'));
    void t;
  });

  test('init refuses an expired package', async () => {
    const base = makeTempDirSync('hallmark-station-');
    await makePackage(join(base, 'p'), { stationSpki: tok.spki, root, manifest: { keyUri: tok.keyUri, validUntil: new Date(Date.now() - 1000).toISOString() }, cert: { notBefore: new Date(Date.now() - 86_400_000) } });
    await assert.rejects(initStation({ dir: join(base, 's'), packageDir: join(base, 'p'), pin: tok.token.pin, module: tok.token.module }), code('STATION_EXPIRED'));
  });

  test('signs device CSRs: subject and SAN from the package, never from the CSR; refuses what it must', async (t) => {
    const { dir } = await station(t, { quota: 6 });
    const p256 = deviceCsr('P-256', 'evil.example.com');
    const p384 = deviceCsr('P-384');
    const ed = deviceCsr('ed25519');
    const tampered = Buffer.from(deviceCsr().der);
    tampered[tampered.length - 5] ^= 0x01;
    const outcomes = await signCsrs({
      dir, pin: tok.token.pin,
      csrs: [
        { source: 'p256', data: p256.pem },
        { source: 'rsa', data: rsaCsr() },
        { source: 'p192', data: p192Csr() },
        { source: 'p384', data: p384.der },
        { source: 'ed25519', data: ed.pem },
        { source: 'tampered', data: tampered },
        { source: 'garbage', data: 'hello' },
        { source: 'p256 again', data: p256.pem },
      ],
    });
    assert.equal(outcomes.length, 8);
    refusedWith(outcomes[1], 'UNSUPPORTED_ALGORITHM', /RSA 2048-bit key; the station signs only P-256, P-384 and Ed25519/);
    refusedWith(outcomes[2], 'UNSUPPORTED_ALGORITHM', /EC key on P-192/);
    refusedWith(outcomes[5], 'CSR_SIGNATURE_INVALID');
    refusedWith(outcomes[6], 'BAD_PEM');
    refusedWith(outcomes[7], 'STATION_DUPLICATE', /already signed at seq 1|same key/);
    const ok = outcomes.filter((o): o is Extract<SignOutcome, { ok: true }> => o.ok);
    assert.deepEqual(ok.map((o) => o.source), ['p256', 'p384', 'ed25519']);
    assert.deepEqual(ok.map((o) => o.seq), [1, 2, 3]);
    const stationCert = parseCertificate(Buffer.from((await readFile(join(dir, 'station.pem'), 'utf8')).split('\n').filter((l) => !l.startsWith('-----')).join(''), 'base64'));
    for (const [o, spki] of [[ok[0]!, p256.spki], [ok[1]!, p384.spki], [ok[2]!, ed.spki]] as const) {
      const c = parseCertificate(o.certificate);
      assert.equal(o.udid, keySha256(spki));
      assert.equal(nameToString(c.subject), `O=Acme Devices, OU=thermostat, OU=batch b-0001, CN=${o.udid}`);
      assert.ok(c.subject.equals(encodeNameString(`${BASE},CN=${o.udid}`)));
      assert.ok(c.subjectPublicKeyInfo.equals(spki));
      assert.ok(c.extensions.get(EXT.subjectAltName)!.value.includes(Buffer.from(`urn:hallmark:udid:${o.udid}`)));
      assert.ok(!o.certificate.includes(Buffer.from('evil.example.com')));
      assert.ok(c.issuer.equals(stationCert.subject));
      assert.ok(nodeVerify(SCHEME_BY_OID.get(c.signatureAlgorithmOid)!.hash, c.tbs, createPublicKey({ key: stationCert.subjectPublicKeyInfo, format: 'der', type: 'spki' }), c.signature));
    }
    // The next run: the same key is a duplicate (or resent on request), then the quota runs out at 6.
    const more = [deviceCsr(), deviceCsr(), deviceCsr(), deviceCsr()];
    const second = await signCsrs({ dir, pin: tok.token.pin, csrs: [{ source: 'again', data: p256.pem }, ...more.map((m, i) => ({ source: `m${i}`, data: m.pem }))] });
    refusedWith(second[0], 'STATION_DUPLICATE', /already signed at seq 1/);
    assert.deepEqual(second.slice(1, 4).map((o) => o.ok && o.seq), [4, 5, 6]);
    refusedWith(second[4], 'STATION_QUOTA_EXHAUSTED', /quota of 6 devices/);
    const resent = await signCsrs({ dir, pin: tok.token.pin, csrs: [{ source: 'again', data: p256.pem }], resend: true });
    assert.ok(resent[0]!.ok && resent[0]!.resent && resent[0]!.certificate.equals(ok[0]!.certificate));
    const status = await stationStatus(dir);
    assert.equal(status.issued, 6);
    assert.equal(status.left, 0);
    assert.equal(status.unsigned, 0, 'each run ends with a checkpoint');
    assert.equal(status.manifestBound, true);

    const v = await verifyJournal(join(dir, 'journal.jsonl'), { stationCertificate: stationCert.der, trustedRoots: [root.der] });
    assert.deepEqual(v.problems, []);
    assert.equal(v.entries.length, 6);
  });

  test('with a device list, only registered keys are signed, with their registry UDID and serial', async (t) => {
    const a = deviceCsr();
    const b = deviceCsr();
    const devices = [{ udid: 'aa01', serialNumber: 'SN 0001', publicKeySha256: keySha256(a.spki) }, { udid: 'aa02', serialNumber: null, publicKeySha256: keySha256(b.spki) }];
    const { dir } = await station(t, { devices });
    const out = await signCsrs({ dir, pin: tok.token.pin, csrs: [{ source: 'a', data: a.pem }, { source: 'stranger', data: deviceCsr().pem }, { source: 'b', data: b.der }] });
    assert.ok(out[0]!.ok && out[0]!.udid === 'aa01' && out[0]!.serialNumber === 'SN 0001');
    refusedWith(out[1], 'STATION_DEVICE_UNKNOWN', /not one of the 2 devices registered for batch b-0001/);
    assert.ok(out[2]!.ok && out[2]!.udid === 'aa02');
    const c = parseCertificate((out[0] as { certificate: Buffer }).certificate);
    assert.ok(c.subject.equals(encodeNameString(`${BASE},CN=aa01`)));
    assert.ok(c.extensions.get(EXT.subjectAltName)!.value.includes(Buffer.from('urn:hallmark:serial:SN%200001')));
    const pkg = JSON.parse(await readFile(join(dir, 'station.json'), 'utf8'));
    const v = await verifyJournal(join(dir, 'journal.jsonl'), { manifest: pkg });
    assert.deepEqual(v.problems, []);
    assert.deepEqual(v.entries.map((e) => [e.udid, e.serialNumber]), [['aa01', 'SN 0001'], ['aa02', null]]);
  });

  test('a checkpoint every 1,000 issuances and at the end of each run; export signs one and verifies', async (t) => {
    const { dir } = await station(t, { quota: 2000 });
    const csrs = Array.from({ length: 1003 }, (_, i) => ({ source: `c${i}`, data: deviceCsr().der }));
    const s = await Station.open({ dir, pin: tok.token.pin });
    try {
      await assert.rejects(Station.open({ dir, pin: tok.token.pin }), code('STATION_BUSY'));
      let groups = 0;
      const out = await s.sign(csrs, { onDurable: async (g) => { groups++; for (const o of g) assert.ok(o.ok); } });
      assert.equal(out.filter((o) => o.ok).length, 1003);
      assert.ok(groups >= 3);
      assert.equal(s.status().lastCheckpoint?.seq, 1000);
      assert.equal(s.status().unsigned, 3);
    } finally {
      await s.close();
    }
    const lines = (await readFile(join(dir, 'journal.jsonl'), 'utf8')).trim().split('\n').map((l) => JSON.parse(l));
    assert.deepEqual(lines.filter((l) => l.type === 'checkpoint').map((l) => l.seq), [1000, 1003]);
    // Export: the journal ends with a checkpoint, so no PIN is needed.
    const target = join(makeTempDirSync(), 'journal.jsonl');
    const r1 = await exportJournal({ dir, out: target });
    assert.equal(r1.checkpointWritten, false);
    assert.equal(r1.verification.entries.length, 1003);
    // A run that ended without its checkpoint (as a killed one does): export needs the PIN and signs one.
    const s2 = await Station.open({ dir, pin: tok.token.pin });
    await s2.sign([{ source: 'x', data: deviceCsr().pem }]);
    await s2.close({ checkpoint: false });
    assert.equal((await stationStatus(dir)).unsigned, 1);
    await assert.rejects(exportJournal({ dir, out: target }), code('PASSPHRASE_REQUIRED', /1 issuance/));
    const r2 = await exportJournal({ dir, out: target, pin: tok.token.pin });
    assert.equal(r2.checkpointWritten, true);
    assert.equal(r2.verification.entries.length, 1004);
    assert.deepEqual(r2.verification.problems, []);
    assert.ok((await readFile(target)).equals(await readFile(join(dir, 'journal.jsonl'))));
    assert.equal((await stationStatus(dir)).unsigned, 0);
  });

  test('a station past its validity signs nothing', async (t) => {
    const { dir } = await station(t, { validUntil: new Date(Date.now() + 2500).toISOString() });
    await new Promise((r) => setTimeout(r, 3000));
    const out = await signCsrs({ dir, pin: tok.token.pin, csrs: [{ source: 'late', data: deviceCsr().pem }] });
    refusedWith(out[0], 'STATION_EXPIRED', /signs nothing more/);
    assert.equal((await stationStatus(dir)).expired, true);
  });
});
