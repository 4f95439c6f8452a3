import assert from 'node:assert/strict';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { HallmarkError } from '../../src/errors.js';
import { decodeStationManifestDigest, stationManifestExtension } from '../../src/pki/extensions.js';
import { encodeNameString } from '../../src/pki/names.js';
import {
  PACKAGE_LIMITS, checkStationPackage, deviceSubject, parseStationManifest, readStationPackage, serializeManifest,
} from '../../src/station/package.js';
import { tempDirFor } from '../helpers/tmp.js';
import { BASE, makeIntermediate, makePackage, makeRoot, makeStationCertificate, manifest, nodeStationKey, pemOf } from './fixtures.js';

const code = (c: string, re?: RegExp) => (err: unknown): boolean => {
  assert.ok(err instanceof HallmarkError, `expected a HallmarkError, got ${String(err)}`);
  assert.equal(err.code, c, err.message);
  if (re) assert.match(err.message, re);
  return true;
};

describe('station.json', () => {
  test('a good manifest round-trips through serializeManifest in the contract order', () => {
    const m = manifest({ devices: [{ udid: 'ab'.repeat(32), serialNumber: 'SN-1', publicKeySha256: 'cd'.repeat(32) }] });
    const text = serializeManifest(m);
    assert.deepEqual(Object.keys(JSON.parse(text)), ['format', 'version', 'stationId', 'line', 'product', 'batch', 'org', 'quota', 'validUntil', 'deviceSubjectBase', 'deviceValidityDays', 'devices', 'keyUri', 'createdAt']);
    assert.deepEqual(parseStationManifest(text), m);
  });

  const bad: Array<[string, Partial<Record<string, unknown>>, RegExp]> = [
    ['format', { format: 'something-else' }, /format/],
    ['version', { version: 2 }, /version 2/],
    ['stationId', { stationId: '' }, /stationId/],
    ['line', { line: 'a line with spaces' }, /line/],
    ['product', { product: 7 }, /product/],
    ['batch', { batch: '../b' }, /batch/],
    ['org', { org: 'x\n' }, /org/],
    ['quota zero', { quota: 0 }, /quota/],
    ['quota fraction', { quota: 1.5 }, /quota/],
    ['quota string', { quota: '10' }, /quota/],
    ['validUntil', { validUntil: 'next year' }, /validUntil/],
    ['deviceSubjectBase with CN', { deviceSubjectBase: 'O=Acme,CN=x' }, /must not contain CN/],
    ['deviceSubjectBase unknown attribute', { deviceSubjectBase: 'FOO=bar' }, /deviceSubjectBase/],
    ['deviceValidityDays', { deviceValidityDays: 0 }, /deviceValidityDays/],
    ['devices not a list', { devices: {} }, /devices/],
    ['device udid', { devices: [{ udid: 'XYZ', serialNumber: null, publicKeySha256: 'cd'.repeat(32) }] }, /devices\[0\]\.udid/],
    ['device key', { devices: [{ udid: 'ab', serialNumber: null, publicKeySha256: 'cd' }] }, /publicKeySha256/],
    ['device serial', { devices: [{ udid: 'ab', serialNumber: 'ü', publicKeySha256: 'cd'.repeat(32) }] }, /serialNumber/],
    ['device extra field', { devices: [{ udid: 'ab', serialNumber: null, publicKeySha256: 'cd'.repeat(32), x: 1 }] }, /unknown field/],
    ['device twice', { devices: [{ udid: 'ab', serialNumber: null, publicKeySha256: 'cd'.repeat(32) }, { udid: 'ab', serialNumber: null, publicKeySha256: 'ef'.repeat(32) }] }, /listed twice/],
    ['key twice', { devices: [{ udid: 'ab', serialNumber: null, publicKeySha256: 'cd'.repeat(32) }, { udid: 'ac', serialNumber: null, publicKeySha256: 'cd'.repeat(32) }] }, /listed twice/],
    ['keyUri', { keyUri: 'file:/x' }, /keyUri/],
    ['keyUri without id', { keyUri: 'pkcs11:token=a' }, /keyUri must name/],
    ['createdAt', { createdAt: 12 }, /createdAt/],
  ];
  for (const [name, override, re] of bad) {
    test(`refuses a bad ${name}`, () => {
      assert.throws(() => parseStationManifest(JSON.stringify({ ...manifest(), ...override })), code('STATION_PACKAGE_INVALID', re));
    });
  }

  test('refuses unknown and missing fields, non-JSON and an oversized file', () => {
    assert.throws(() => parseStationManifest(JSON.stringify({ ...manifest(), extra: true })), code('STATION_PACKAGE_INVALID', /unknown field "extra"/));
    const { quota: _q, ...noQuota } = manifest();
    assert.throws(() => parseStationManifest(JSON.stringify(noQuota)), code('STATION_PACKAGE_INVALID', /missing field quota/));
    assert.throws(() => parseStationManifest('{not json'), code('STATION_PACKAGE_INVALID', /not JSON/));
    assert.throws(() => parseStationManifest('[]'), code('STATION_PACKAGE_INVALID', /object/));
    assert.throws(() => parseStationManifest(' '.repeat(PACKAGE_LIMITS.manifestBytes + 1)), code('STATION_PACKAGE_INVALID', /limit/));
  });
});

describe('station package', () => {
  const station = nodeStationKey();

  test('a package made by a root checks out; the device subject is the base plus CN', async (t) => {
    const dir = await tempDirFor(t);
    const { root } = await makePackage(dir, { stationSpki: station.spki });
    const pkg = await readStationPackage(dir);
    assert.equal(pkg.manifest.stationId, 'st-1');
    assert.ok(pkg.root.der.equals(root.der));
    assert.ok(pkg.subjectBase.equals(encodeNameString(BASE)));
    assert.equal(pkg.keyAlgorithm, 'ecdsa-p256');
    assert.ok(deviceSubject(pkg.subjectBase, 'abcd').equals(encodeNameString(`${BASE},CN=abcd`)));
    assert.ok(Math.abs(pkg.signsUntil.getTime() - new Date(pkg.manifest.validUntil).getTime()) < 1000);
  });

  test('a chain with an intermediate is accepted when path lengths allow it', async (t) => {
    const dir = await tempDirFor(t);
    const root = makeRoot();
    const mid = makeIntermediate(root, { pathLen: 1 });
    await makePackage(dir, { stationSpki: station.spki, root: mid, chain: [mid.der, root.der] });
    const pkg = await readStationPackage(dir);
    assert.equal(pkg.chain.length, 2);
    // pathLen 0 on the intermediate leaves no room for the station CA below it.
    const dir2 = await tempDirFor(t);
    const tight = makeIntermediate(root, { pathLen: 0 });
    await makePackage(dir2, { stationSpki: station.spki, root: tight, chain: [tight.der, root.der] });
    await assert.rejects(readStationPackage(dir2), code('STATION_PACKAGE_INVALID', /allows 0 CA certificate/));
  });

  const certCases: Array<[string, Record<string, unknown>, string, RegExp]> = [
    ['without pathLen 0', { pathLen: 1 }, 'STATION_PACKAGE_INVALID', /pathLen 0/],
    ['without any pathLen', { pathLen: null }, 'STATION_PACKAGE_INVALID', /pathLen 0/],
    ['without name constraints', { constraints: 'none' }, 'STATION_PACKAGE_INVALID', /no name constraints/],
    ['with non-critical name constraints', { constraints: 'non-critical' }, 'STATION_PACKAGE_INVALID', /must be critical/],
    ['constrained to another subtree', { constraints: ['O=Acme Devices,OU=kettle'] }, 'STATION_PACKAGE_INVALID', /permit "O=Acme Devices, OU=kettle"/],
    ['constrained to two subtrees', { constraints: [BASE, 'O=Other'] }, 'STATION_PACKAGE_INVALID', /exactly one directoryName/],
    ['that is not a CA', { ca: false }, 'STATION_PACKAGE_INVALID', /not a CA/],
    ['that has expired', { notBefore: new Date(Date.now() - 10 * 86_400_000), notAfter: new Date(Date.now() - 86_400_000) }, 'STATION_EXPIRED', /expired/],
    ['that outlives validUntil', { notAfter: new Date(Date.now() + 400 * 86_400_000) }, 'STATION_PACKAGE_INVALID', /past the package's validUntil/],
  ];
  for (const [name, cert, c, re] of certCases) {
    test(`refuses a station certificate ${name}`, async (t) => {
      const dir = await tempDirFor(t);
      await makePackage(dir, { stationSpki: station.spki, cert });
      await assert.rejects(readStationPackage(dir), code(c, re));
    });
  }

  test('refuses a station certificate signed by another root than chain.pem\'s', async (t) => {
    const dir = await tempDirFor(t);
    await makePackage(dir, { stationSpki: station.spki, chain: [makeRoot({ cn: 'Another Root' }).der] });
    await assert.rejects(readStationPackage(dir), code('STATION_PACKAGE_INVALID', /is not signed by the root/));
  });

  test('refuses a chain that does not end with a self-signed root, and an untrusted root', async (t) => {
    const dir = await tempDirFor(t);
    const root = makeRoot();
    const mid = makeIntermediate(root);
    await makePackage(dir, { stationSpki: station.spki, root: mid, chain: [mid.der] });
    await assert.rejects(readStationPackage(dir), code('STATION_PACKAGE_INVALID', /self-signed root/));
    const dir2 = await tempDirFor(t);
    await makePackage(dir2, { stationSpki: station.spki });
    await assert.rejects(readStationPackage(dir2, { trustedRoots: [makeRoot().der] }), code('STATION_PACKAGE_INVALID', /not a trusted root/));
  });

  test('an expired package is refused for signing but readable for an import', async (t) => {
    const dir = await tempDirFor(t);
    const past = new Date(Date.now() - 86_400_000).toISOString();
    await makePackage(dir, { stationSpki: station.spki, manifest: { validUntil: past }, cert: { notBefore: new Date(Date.now() - 10 * 86_400_000) } });
    await assert.rejects(readStationPackage(dir), code('STATION_EXPIRED'));
    const pkg = await readStationPackage(dir, { checkValidity: false });
    assert.ok(pkg.signsUntil < new Date());
  });

  test('names a missing, oversized or broken file', async (t) => {
    const dir = await tempDirFor(t);
    await makePackage(dir, { stationSpki: station.spki });
    const pem = await readFile(join(dir, 'station.pem'), 'utf8');
    await writeFile(join(dir, 'station.pem'), pem + pem);
    await assert.rejects(readStationPackage(dir), code('STATION_PACKAGE_INVALID', /exactly one certificate/));
    await writeFile(join(dir, 'station.pem'), pem.slice(0, 100));
    await assert.rejects(readStationPackage(dir), code('STATION_PACKAGE_INVALID', /station\.pem/));
    await writeFile(join(dir, 'station.pem'), 'x'.repeat(PACKAGE_LIMITS.certificateBytes + 1));
    await assert.rejects(readStationPackage(dir), code('STATION_PACKAGE_INVALID', /over the .*limit/));
    const empty = await tempDirFor(t);
    await mkdir(join(empty, 'p'));
    await assert.rejects(readStationPackage(join(empty, 'p')), code('STATION_PACKAGE_INVALID', /no station\.json/));
    await assert.rejects(readStationPackage(join(empty, 'nothing')), code('STATION_PACKAGE_INVALID', /no station package/));
  });

  test('checkStationPackage takes the three parts directly', () => {
    const root = makeRoot();
    const m = manifest();
    const certificate = makeStationCertificate({ issuer: root, stationSpki: station.spki, notAfter: new Date(m.validUntil) });
    const pkg = checkStationPackage({ manifest: serializeManifest(m), certificate: pemOf(certificate), chain: pemOf(root.der) });
    assert.ok(pkg.certificate.der.equals(certificate));
    assert.throws(() => checkStationPackage({ manifest: m, certificate: pemOf(certificate), chain: pemOf(root.der) + '-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n' }), code('STATION_PACKAGE_INVALID', /PRIVATE KEY, not a CERTIFICATE/));
  });

  test('station.json bound to station.pem by the root: a raised quota, a later validUntil or another device list is refused', async (t) => {
    const dir = await tempDirFor(t);
    const made = await makePackage(dir, { stationSpki: station.spki });
    assert.equal((await readStationPackage(dir, { requireBoundManifest: true })).manifestBound, true);
    const text = await readFile(join(dir, 'station.json'), 'utf8');
    // Reformatting changes nothing (the digest is over the one serialised form).
    await writeFile(join(dir, 'station.json'), JSON.stringify(JSON.parse(text)));
    assert.equal((await readStationPackage(dir)).manifestBound, true);
    for (const edit of [{ quota: 11 }, { validUntil: new Date(new Date(made.manifest.validUntil).getTime() - 86_400_000).toISOString() }, { devices: [{ udid: 'ab'.repeat(32), serialNumber: null, publicKeySha256: 'cd'.repeat(32) }] }]) {
      await writeFile(join(dir, 'station.json'), serializeManifest({ ...made.manifest, ...edit } as typeof made.manifest));
      await assert.rejects(readStationPackage(dir), code('STATION_PACKAGE_INVALID', /not the manifest the root signed off/), JSON.stringify(edit));
    }
  });

  test('a package made before the binding: accepted where it was (an installed station), refused where a package is installed', async (t) => {
    const dir = await tempDirFor(t);
    await makePackage(dir, { stationSpki: station.spki, cert: { manifestDigest: null } });
    assert.equal((await readStationPackage(dir)).manifestBound, false);
    await assert.rejects(readStationPackage(dir, { requireBoundManifest: true }), code('STATION_PACKAGE_INVALID', /does not carry the digest of station\.json/));
  });

  test('a certificate bound to another manifest is refused; a digest of the wrong length cannot be made or read', () => {
    const root = makeRoot();
    const m = manifest();
    const certificate = makeStationCertificate({ issuer: root, stationSpki: station.spki, notAfter: new Date(m.validUntil), manifestDigest: Buffer.alloc(32) });
    assert.throws(() => checkStationPackage({ manifest: m, certificate: pemOf(certificate), chain: pemOf(root.der) }), code('STATION_PACKAGE_INVALID', /not the manifest the root signed off/));
    assert.throws(() => stationManifestExtension(Buffer.alloc(31)), code('BAD_REQUEST'));
    assert.throws(() => decodeStationManifestDigest(Buffer.from([0x04, 0x1f, ...Buffer.alloc(31)])), code('BAD_DER', /31 bytes, not 32/));
  });
});
