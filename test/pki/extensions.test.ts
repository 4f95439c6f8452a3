import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { HallmarkError, type ErrorCode } from '../../src/errors.js';
import { TAG, children, readWhole } from '../../src/pki/der.js';
import {
  EXT, KEY_USAGE_BITS, basicConstraints, decodeBasicConstraints, decodeKeyUsage, generalNames, keyUsage, nameConstraints, subjectAltName,
} from '../../src/pki/extensions.js';


/** The extnValue (inside the OCTET STRING) and criticality of a DER Extension. */
function parts(ext: Buffer): { oid: string; critical: boolean; value: Buffer } {
  const t = readWhole(ext, TAG.SEQUENCE, 'Extension');
  const f = children(ext, t);
  const value = f[f.length - 1]!;
  return { oid: ext.subarray(f[0]!.contentStart, f[0]!.end).toString('hex'), critical: f.length === 3, value: ext.subarray(value.contentStart, value.end) };
}

const ipOf = (ip: string): string => {
  const gn = generalNames({ ip: [ip] })[0]!;
  assert.equal(gn[0], 0x87);
  return gn.subarray(2).toString('hex');
};

describe('keyUsage: DER named bit list', () => {
  const cases: Array<[usages: Parameters<typeof keyUsage>[0], valueHex: string]> = [
    [['digitalSignature'], '03020780'],
    [['digitalSignature', 'keyEncipherment'], '030205a0'],
    [['keyCertSign', 'cRLSign'], '03020106'],
    [['keyAgreement'], '03020308'],
    [['decipherOnly'], '0303070080'],
    [['digitalSignature', 'decipherOnly'], '0303078080'],
  ];
  for (const [usages, valueHex] of cases) {
    test(`${usages.join('+')} -> ${valueHex}, critical, and decodes back`, () => {
      const p = parts(keyUsage(usages));
      assert.equal(p.critical, true);
      assert.equal(p.value.toString('hex'), valueHex);
      assert.deepEqual(decodeKeyUsage(p.value), [...usages].sort((a, b) => KEY_USAGE_BITS.indexOf(a) - KEY_USAGE_BITS.indexOf(b)));
    });
  }
  test('no usage at all is refused', () => assert.throws(() => keyUsage([]), RangeError));
});

describe('basicConstraints', () => {
  test('end entity: critical, empty SEQUENCE (cA FALSE is the DER default)', () => {
    const p = parts(basicConstraints(false));
    assert.equal(p.critical, true);
    assert.equal(p.value.toString('hex'), '3000');
    assert.deepEqual(decodeBasicConstraints(p.value), { ca: false });
  });
  test('CA with and without pathLen', () => {
    assert.deepEqual(decodeBasicConstraints(parts(basicConstraints(true, 0)).value), { ca: true, pathLen: 0 });
    assert.deepEqual(decodeBasicConstraints(parts(basicConstraints(true, 3)).value), { ca: true, pathLen: 3 });
    assert.deepEqual(decodeBasicConstraints(parts(basicConstraints(true)).value), { ca: true });
  });
});

describe('subject alternative names', () => {
  test('IPv4 and IPv6 addresses', () => {
    assert.equal(ipOf('10.1.2.3'), '0a010203');
    assert.equal(ipOf('::1'), '00000000000000000000000000000001');
    assert.equal(ipOf('::'), '0'.repeat(32));
    assert.equal(ipOf('2001:db8::7'), '20010db8000000000000000000000007');
    assert.equal(ipOf('fe80::1:2'), 'fe800000000000000000000000010002');
    assert.equal(ipOf('1:2:3:4:5:6:7:8'), '00010002000300040005000600070008');
    assert.equal(ipOf('1::'), '00010000000000000000000000000000');
  });

  test('an IPv4-mapped IPv6 address encodes its IPv4 part (was written as ::ffff:0.1)', () => {
    assert.equal(ipOf('::ffff:192.0.2.1'), '00000000000000000000ffffc0000201');
    assert.equal(ipOf('0:0:0:0:0:ffff:1.2.3.4'), '00000000000000000000ffff01020304');
    assert.equal(ipOf('64:ff9b::198.51.100.7'), '0064ff9b0000000000000000c6336407');
  });

  test('names are checked and DNS names lower-cased', () => {
    const [dns] = generalNames({ dns: ['Sensor-7.Example.COM'] });
    assert.equal(dns!.subarray(2).toString(), 'sensor-7.example.com');
    assert.doesNotThrow(() => generalNames({ dns: ['*.example.com'] }));
    for (const bad of [{ dns: ['bad name'] }, { dns: ['-x.example'] }, { dns: ['a'.repeat(64) + '.example'] }, { ip: ['10.0.0.256'] }, { ip: ['host'] }, { email: ['nobody'] }, { uri: ['no scheme'] }]) {
      assert.throws(() => generalNames(bad), hasCode('BAD_REQUEST'), JSON.stringify(bad));
    }
  });

  test('an empty subjectAltName is refused', () => {
    assert.throws(() => subjectAltName({}), hasCode('BAD_REQUEST'));
    assert.equal(parts(subjectAltName({ dns: ['a.example'] })).oid, '551d11');
  });
});

describe('nameConstraints', () => {
  test('permitted DNS subtrees, critical', () => {
    const p = parts(nameConstraints({ dns: ['.example.com', 'fleet.example'] }));
    assert.equal(p.critical, true);
    assert.ok(p.value.includes(Buffer.from('example.com')));
    assert.ok(!p.value.includes(Buffer.from('.example.com')), 'the leading dot is dropped');
    assert.throws(() => nameConstraints({}), hasCode('BAD_REQUEST'));
    assert.equal(EXT.nameConstraints, '2.5.29.30');
  });
});

import { test as zoneTest } from 'node:test';
import assertZone from 'node:assert/strict';
import { subjectAltName as sanForZone } from '../../src/pki/extensions.js';
import { hasCode } from '../helpers/assertions.js';

zoneTest('an IPv6 address with a zone id is refused (the zone was silently dropped)', () => {
  assertZone.throws(() => sanForZone({ ip: ['fe80::1%eth0'] }), { code: 'BAD_REQUEST' });
});
