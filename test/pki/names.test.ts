import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { HallmarkError, type ErrorCode } from '../../src/errors.js';
import { TAG, oid, seq, set, tlv, utf8String } from '../../src/pki/der.js';
import { commonNameOf, decodeName, encodeName, encodeNameString, nameToString, parseNameString } from '../../src/pki/names.js';


describe('distinguished names: text -> DER -> text', () => {
  test('order is kept, one attribute per RDN, with the right string types', () => {
    const der = encodeNameString('CN=Device 1,O=Acme,OU=Line A,C=DE');
    assert.equal(nameToString(der), 'CN=Device 1, O=Acme, OU=Line A, C=DE');
    assert.deepEqual(decodeName(der), [
      { type: 'CN', value: 'Device 1' }, { type: 'O', value: 'Acme' }, { type: 'OU', value: 'Line A' }, { type: 'C', value: 'DE' },
    ]);
    // Exact DER: CN/O/OU as UTF8String, C as PrintableString (what OpenSSL writes by default).
    const expected = seq(
      set(seq(oid('2.5.4.3'), utf8String('Device 1'))),
      set(seq(oid('2.5.4.10'), utf8String('Acme'))),
      set(seq(oid('2.5.4.11'), utf8String('Line A'))),
      set(seq(oid('2.5.4.6'), tlv(TAG.PRINTABLE_STRING, Buffer.from('DE')))),
    );
    assert.equal(der.toString('hex'), expected.toString('hex'));
  });

  test('text produced by nameToString parses back to the same DER', () => {
    for (const text of [
      'CN=device-0001,O=Acme GmbH,C=DE',
      'CN=Gerät München,O=Ünïcødé ✓,L=Zürich',
      'CN=x,SERIALNUMBER=ABC-123,DC=example,DC=com,EMAIL=ops@example.com,UID=u1,TITLE=t,ST=Bavaria,STREET=Main St 1,DNQUALIFIER=q1',
    ]) {
      const der = encodeNameString(text);
      assert.ok(encodeNameString(nameToString(der)).equals(der), text);
    }
  });

  test('attribute names are case-insensitive; serialNumber and emailAddress long forms', () => {
    const a = encodeNameString('cn=x,o=y,serialNumber=42,emailAddress=a@b.example');
    const b = encodeNameString('CN=x,O=y,SERIALNUMBER=42,EMAIL=a@b.example');
    assert.ok(a.equals(b));
    assert.equal(nameToString(a), 'CN=x, O=y, serialNumber=42, emailAddress=a@b.example');
  });

  test('whitespace around types and values is not part of the name', () => {
    assert.ok(encodeNameString('  CN = Device 1 ,  O = Acme ').equals(encodeNameString('CN=Device 1,O=Acme')));
  });

  test('the OpenSSL slash form /CN=a/O=b gives the same name', () => {
    assert.ok(encodeNameString('/CN=Device 1/O=Acme/C=DE').equals(encodeNameString('CN=Device 1,O=Acme,C=DE')));
  });

  test('a "/" inside a value of a comma-form name is part of the value (was split as a slash-form name)', () => {
    assert.deepEqual(parseNameString('CN=line-a/device-7'), [{ type: 'CN', value: 'line-a/device-7' }]);
    assert.deepEqual(parseNameString('CN=https://fleet.example/d/7'), [{ type: 'CN', value: 'https://fleet.example/d/7' }]);
    assert.deepEqual(parseNameString('CN=a/b,O=c'), [{ type: 'CN', value: 'a/b' }, { type: 'O', value: 'c' }]);
  });

  test('a "," inside a value of a slash-form name is part of the value', () => {
    assert.deepEqual(parseNameString('/CN=Doe, John/O=Acme'), [{ type: 'CN', value: 'Doe, John' }, { type: 'O', value: 'Acme' }]);
  });

  test('commonNameOf finds the CN', () => {
    assert.equal(commonNameOf(encodeNameString('O=Acme,CN=dev 9')), 'dev 9');
    assert.equal(commonNameOf(encodeNameString('O=Acme')), undefined);
  });
});

describe('escaping', () => {
  const specials = ['a,b', 'x+y', 'say "hi"', 'back\\slash', '<tag>', 'semi;colon', 'k=v', '#hash', 'end#', 'multi,,,commas'];
  for (const value of specials) {
    test(`value ${JSON.stringify(value)} survives text -> DER -> text -> DER`, () => {
      const escaped = value.replace(/([,+"\\<>;=#])/g, '\\$1');
      const der = encodeNameString(`CN=${escaped},O=Acme`);
      assert.deepEqual(decodeName(der), [{ type: 'CN', value }, { type: 'O', value: 'Acme' }]);
      const text = nameToString(der);
      assert.ok(encodeNameString(text).equals(der), `${text} does not parse back`);
    });
  }

  test('nameToString escapes separators so a value cannot inject an attribute', () => {
    const der = encodeName([{ type: 'CN', value: 'evil, O=Other' }]);
    const text = nameToString(der);
    assert.equal(text, 'CN=evil\\, O\\=Other');
    assert.deepEqual(parseNameString(text), [{ type: 'CN', value: 'evil, O=Other' }]);
  });
});

describe('bad names', () => {
  test('unknown attribute -> BAD_REQUEST naming it', () => {
    assert.throws(() => encodeNameString('CN=x,FOO=bar'), (err) => hasCode('BAD_REQUEST')(err) && /FOO/.test((err as Error).message));
    assert.throws(() => encodeName([{ type: 'XX', value: 'y' }]), hasCode('BAD_REQUEST'));
  });

  test('C must be a two-letter (upper-case) country code', () => {
    for (const c of ['DEU', 'D', 'de', 'D1', 'Germany']) assert.throws(() => encodeNameString(`CN=x,C=${c}`), hasCode('BAD_REQUEST'), c);
    assert.doesNotThrow(() => encodeNameString('CN=x,C=DE'));
  });

  test('syntax errors: missing "=", empty value, empty name', () => {
    for (const text of ['CN', 'CN=x,O', 'CN=', 'CN=x,O= ', '', '   ', '/']) assert.throws(() => encodeNameString(text), hasCode('BAD_REQUEST'), JSON.stringify(text));
  });

  test('PrintableString attributes refuse other characters; e-mail must be ASCII', () => {
    assert.throws(() => encodeNameString('CN=x,SERIALNUMBER=a_b'), hasCode('BAD_REQUEST'));
    assert.throws(() => encodeNameString('CN=x,SERIALNUMBER=ü'), hasCode('BAD_REQUEST'));
    assert.throws(() => encodeNameString('CN=x,EMAIL=ü@example.com'), hasCode('BAD_REQUEST'));
  });

  test('overlong values and names', () => {
    assert.throws(() => encodeNameString(`CN=${'a'.repeat(257)}`), hasCode('BAD_REQUEST'));
    assert.doesNotThrow(() => encodeNameString(`CN=${'a'.repeat(256)}`));
    assert.throws(() => encodeNameString(`CN=${'a'.repeat(5000)}`), hasCode('INPUT_TOO_LARGE'));
  });
});

describe('decoding names written by others', () => {
  test('BMPString, PrintableString, IA5String and unknown attribute OIDs', () => {
    const bmp = Buffer.from('Ωmega', 'utf16le').swap16();
    const der = seq(
      set(seq(oid('2.5.4.3'), tlv(0x1e, bmp))),
      set(seq(oid('2.5.4.10'), tlv(TAG.PRINTABLE_STRING, Buffer.from('Acme')))),
      set(seq(oid('0.9.2342.19200300.100.1.25'), tlv(TAG.IA5_STRING, Buffer.from('example')))),
      set(seq(oid('1.2.3.4.5'), utf8String('custom'))),
    );
    assert.deepEqual(decodeName(der), [
      { type: 'CN', value: 'Ωmega' }, { type: 'O', value: 'Acme' }, { type: 'DC', value: 'example' }, { type: '1.2.3.4.5', value: 'custom' },
    ]);
  });

  test('a multi-valued RDN yields every attribute', () => {
    const der = seq(set(seq(oid('2.5.4.3'), utf8String('a')), seq(oid('2.5.4.10'), utf8String('b'))));
    assert.deepEqual(decodeName(der).map((a) => a.type), ['CN', 'O']);
  });

  test('malformed names -> BAD_DER', () => {
    for (const der of [
      seq(seq(oid('2.5.4.3'), utf8String('a'))), // RDN is not a SET
      seq(set(seq(utf8String('a'), utf8String('b')))), // type is not an OID
      seq(set(seq(oid('2.5.4.3')))), // no value
      Buffer.concat([seq(), Buffer.from([0])]), // trailing byte
      Buffer.from([0x30, 0x05, 0x31]), // truncated
    ]) {
      assert.throws(() => decodeName(der), hasCode('BAD_DER'), der.toString('hex'));
    }
  });
});

import { test as regression } from 'node:test';
import assertStrict from 'node:assert/strict';
import { encodeNameString as encodeForRegression, nameToString as nameToStringForRegression, parseNameString as parseForRegression } from '../../src/pki/names.js';
import { hasCode } from '../helpers/assertions.js';

regression('escaped leading and trailing spaces are kept (were trimmed, so a name did not round-trip)', () => {
  assertStrict.deepEqual(parseForRegression('CN=\\ x\\ ,O=Acme'), [{ type: 'CN', value: ' x ' }, { type: 'O', value: 'Acme' }]);
  assertStrict.deepEqual(parseForRegression('CN=  x  '), [{ type: 'CN', value: 'x' }]);
  const text = nameToStringForRegression(encodeForRegression('CN=\\ padded\\ '));
  assertStrict.deepEqual(parseForRegression(text), [{ type: 'CN', value: ' padded ' }]);
});
