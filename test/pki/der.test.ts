import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { HallmarkError, type ErrorCode } from '../../src/errors.js';
import {
  TAG, children, decodeOid, decodeTime, expectTlv, oid, readTlv, readWhole, seq, smallInteger, time, tlv, unsignedInteger,
} from '../../src/pki/der.js';


const hex = (h: string): Buffer => Buffer.from(h.replace(/\s/g, ''), 'hex');

describe('DER lengths', () => {
  const cases: Array<[length: number, header: string]> = [
    [0, '0400'],
    [1, '0401'],
    [127, '047f'],
    [128, '048180'],
    [255, '0481ff'],
    [256, '04820100'],
    [65535, '0482ffff'],
    [65536, '0483010000'],
  ];
  for (const [length, header] of cases) {
    test(`${length} content bytes: minimal header ${header} and read back`, () => {
      const body = Buffer.alloc(length, 0xa5);
      const encoded = tlv(TAG.OCTET_STRING, body);
      assert.equal(encoded.subarray(0, header.length / 2).toString('hex'), header);
      assert.equal(encoded.length, header.length / 2 + length);
      const t = readWhole(encoded, TAG.OCTET_STRING, 'test');
      assert.equal(t.tag, TAG.OCTET_STRING);
      assert.equal(t.start, 0);
      assert.equal(t.contentStart, header.length / 2);
      assert.equal(t.end, encoded.length);
      assert.ok(encoded.subarray(t.contentStart, t.end).equals(body));
    });
  }

  test('tlv concatenates several content buffers', () => {
    const t = tlv(TAG.SEQUENCE, Buffer.from([1, 2]), Buffer.alloc(0), Buffer.from([3]));
    assert.equal(t.toString('hex'), '3003010203');
  });

  test('nested TLVs: children are read in order and stay inside their parent', () => {
    const der = seq(smallInteger(5), seq(oid('2.5.4.3')), tlv(TAG.OCTET_STRING, Buffer.alloc(300, 1)));
    const root = readWhole(der, TAG.SEQUENCE, 'root');
    const kids = children(der, root);
    assert.deepEqual(kids.map((k) => k.tag), [TAG.INTEGER, TAG.SEQUENCE, TAG.OCTET_STRING]);
    assert.equal(kids[2]!.end, der.length);
    assert.equal(decodeOid(der.subarray(children(der, kids[1]!)[0]!.contentStart, children(der, kids[1]!)[0]!.end)), '2.5.4.3');
  });
});

describe('DER INTEGERs', () => {
  test('unsignedInteger strips leading zeros and adds a sign pad for a high bit', () => {
    assert.equal(unsignedInteger(hex('00000102')).toString('hex'), '02020102');
    assert.equal(unsignedInteger(hex('80')).toString('hex'), '02020080');
    assert.equal(unsignedInteger(hex('0000ff01')).toString('hex'), '020300ff01');
    assert.equal(unsignedInteger(hex('7f')).toString('hex'), '02017f');
    assert.equal(unsignedInteger(hex('0000')).toString('hex'), '020100');
    assert.equal(unsignedInteger(Buffer.alloc(0)).toString('hex'), '020100');
  });

  test('smallInteger encodes minimally and refuses out-of-range values', () => {
    assert.equal(smallInteger(0).toString('hex'), '020100');
    assert.equal(smallInteger(127).toString('hex'), '02017f');
    assert.equal(smallInteger(128).toString('hex'), '02020080');
    assert.equal(smallInteger(256).toString('hex'), '02020100');
    assert.equal(smallInteger(0x7fffffff).toString('hex'), '02047fffffff');
    assert.throws(() => smallInteger(-1), RangeError);
    assert.throws(() => smallInteger(1.5), RangeError);
    assert.throws(() => smallInteger(0x80000000), RangeError);
  });
});

describe('DER OBJECT IDENTIFIERs', () => {
  test('known encodings', () => {
    assert.equal(oid('1.2.840.113549').toString('hex'), '06062a864886f70d');
    assert.equal(oid('2.5.29.19').toString('hex'), '0603551d13');
    assert.equal(oid('1.3.101.112').toString('hex'), '06032b6570');
    assert.equal(oid('0.9.2342.19200300.100.1.25').toString('hex'), '060a0992268993f22c640119');
    // First two arcs 2.999 -> 1079, which needs two base-128 digits.
    assert.equal(oid('2.999.3').toString('hex'), '0603883703');
  });

  const oids = [
    '1.2.840.10045.4.3.2',
    '1.2.840.113549.1.1.11',
    '0.9.2342.19200300.100.1.1',
    '1.3.6.1.5.5.7.48.1.5',
    '2.5.4.3',
    '0.0',
    '2.999',
    '2.999.1',
    '2.100.3',
    '1.39.127.128.16383.16384.2097151.2097152',
    '1.3.6.1.4.1.4294967295.4294967296',
    '1.3.6.1.4.1.18446744073709551615.18446744073709551616',
    '2.25.329800735698586629295641978511506172918', // a UUID OID: a 128-bit arc
  ];
  for (const dotted of oids) {
    test(`round trip ${dotted}`, () => {
      const encoded = oid(dotted);
      const t = readWhole(encoded, TAG.OID, 'OID');
      assert.equal(decodeOid(encoded.subarray(t.contentStart, t.end)), dotted);
    });
  }

  test('malformed OID text is refused', () => {
    for (const bad of ['', '1', '1.2.x', '1..2', '-1.2', '1.2.3.']) assert.throws(() => oid(bad), RangeError, bad);
  });

  test('malformed OID content: empty, or ending inside an arc -> BAD_DER', () => {
    assert.throws(() => decodeOid(Buffer.alloc(0)), hasCode('BAD_DER'));
    assert.throws(() => decodeOid(hex('2a86')), hasCode('BAD_DER'));
  });
});

describe('DER times (RFC 5280 4.1.2.5)', () => {
  const cases: Array<[iso: string, tag: number, text: string]> = [
    ['1950-01-01T00:00:00Z', TAG.UTC_TIME, '500101000000Z'],
    ['1999-12-31T23:59:59Z', TAG.UTC_TIME, '991231235959Z'],
    ['2000-01-01T00:00:00Z', TAG.UTC_TIME, '000101000000Z'],
    ['2026-03-04T05:06:07Z', TAG.UTC_TIME, '260304050607Z'],
    ['2049-12-31T23:59:59Z', TAG.UTC_TIME, '491231235959Z'],
    ['2050-01-01T00:00:00Z', TAG.GENERALIZED_TIME, '20500101000000Z'],
    ['2106-02-07T06:28:16Z', TAG.GENERALIZED_TIME, '21060207062816Z'],
    ['1949-12-31T23:59:59Z', TAG.GENERALIZED_TIME, '19491231235959Z'],
    ['9999-12-31T23:59:59Z', TAG.GENERALIZED_TIME, '99991231235959Z'],
  ];
  for (const [iso, tag, text] of cases) {
    test(`${iso} -> ${tag === TAG.UTC_TIME ? 'UTCTime' : 'GeneralizedTime'} ${text}`, () => {
      const encoded = time(new Date(iso));
      const t = readWhole(encoded, tag, 'Time');
      assert.equal(encoded.toString('ascii', t.contentStart, t.end), text);
      assert.equal(decodeTime(encoded, t).toISOString(), new Date(iso).toISOString());
    });
  }

  test('milliseconds are truncated to whole seconds', () => {
    const encoded = time(new Date('2030-06-01T12:00:00.999Z'));
    assert.equal(decodeTime(encoded, readTlv(encoded, 0)).toISOString(), '2030-06-01T12:00:00.000Z');
  });

  test('times that are not Zulu, not whole seconds, or of the wrong tag -> BAD_DER', () => {
    const bad = [
      tlv(TAG.UTC_TIME, Buffer.from('2603040506Z')), // no seconds
      tlv(TAG.UTC_TIME, Buffer.from('260304050607+0100')),
      tlv(TAG.UTC_TIME, Buffer.from('20260304050607Z')), // four-digit year in a UTCTime
      tlv(TAG.GENERALIZED_TIME, Buffer.from('260304050607Z')),
      tlv(TAG.GENERALIZED_TIME, Buffer.from('20260304050607.5Z')),
      tlv(TAG.OCTET_STRING, Buffer.from('260304050607Z')),
    ];
    for (const b of bad) assert.throws(() => decodeTime(b, readTlv(b, 0)), hasCode('BAD_DER'), b.toString('hex'));
  });
});

describe('malformed DER -> BAD_DER', () => {
  const cases: Record<string, string> = {
    'empty input': '',
    'tag without length': '30',
    'truncated content': '3005010203',
    'truncated long-form length': '308201',
    'indefinite length': '30800000',
    'non-minimal long form for a short length': '048105' + '00'.repeat(5),
    'non-minimal: leading zero length octet': '04820080' + '00'.repeat(0x80),
    'length of more than four octets': '0485010000000000',
    'high tag number form': '1f2200',
  };
  for (const [name, h] of Object.entries(cases)) {
    test(name, () => {
      assert.throws(() => readWhole(hex(h), hex(h)[0] ?? TAG.SEQUENCE, 'x'), hasCode('BAD_DER'));
    });
  }

  test('non-minimal length 0x81 0x05 is refused although the content is there', () => {
    const der = hex('0481050102030405');
    assert.throws(() => readTlv(der, 0), hasCode('BAD_DER'));
    assert.equal(readTlv(hex('04050102030405'), 0).end, 7); // the minimal form reads fine
  });

  test('trailing bytes after the outer element', () => {
    const der = Buffer.concat([seq(smallInteger(1)), Buffer.from([0])]);
    assert.throws(() => readWhole(der, TAG.SEQUENCE, 'thing'), (err) => hasCode('BAD_DER')(err) && /trailing/.test((err as Error).message));
  });

  test('a child longer than its parent is refused even when the buffer goes on', () => {
    // SEQUENCE of length 3 whose OCTET STRING child claims 5 bytes; the bytes exist after the parent.
    const der = hex('3003040500 0000000000');
    const parent = readTlv(der, 0);
    assert.throws(() => children(der, parent), hasCode('BAD_DER'));
  });

  test('expectTlv names the wrong tag', () => {
    assert.throws(() => expectTlv(hex('0400'), 0, TAG.SEQUENCE, 2, 'Name'), (err) => hasCode('BAD_DER')(err) && /Name/.test((err as Error).message));
  });

  test('readTlv never reads past the given limit', () => {
    const der = hex('04030102030000');
    assert.throws(() => readTlv(der, 0, 4), hasCode('BAD_DER'));
    assert.equal(readTlv(der, 0, 5).end, 5);
  });
});

import { test as impossibleDateTest } from 'node:test';
import assertDates from 'node:assert/strict';
import { decodeTime as decodeTimeForRegression, readTlv as readTlvForRegression } from '../../src/pki/der.js';
import { hasCode } from '../helpers/assertions.js';

impossibleDateTest('impossible dates in a UTCTime or GeneralizedTime are malformed (were rolled over into later dates)', () => {
  for (const [tag, text] of [[0x17, '261321000000Z'], [0x17, '261132000000Z'], [0x18, '20260230120000Z'], [0x17, '261121240000Z'], [0x17, '261121126000Z']] as const) {
    const der = Buffer.concat([Buffer.from([tag, text.length]), Buffer.from(text, 'ascii')]);
    assertDates.throws(() => decodeTimeForRegression(der, readTlvForRegression(der, 0)), { code: 'BAD_DER' }, text);
  }
  const ok = Buffer.concat([Buffer.from([0x17, 13]), Buffer.from('240229235959Z', 'ascii')]);
  assertDates.equal(decodeTimeForRegression(ok, readTlvForRegression(ok, 0)).toISOString(), '2024-02-29T23:59:59.000Z');
});
