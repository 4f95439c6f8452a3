// Stamp formats (json, tlv, nvs): exact round trips with real keys and certificates, the documented
// layouts read back independently, and every malformed input refused with a clear STAMP_INVALID.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import * as zlib from 'node:zlib';
import { describe, test } from 'node:test';
import { HallmarkError, type ErrorCode } from '../../src/errors.js';
import { STAMP_FORMATS, formatByName, formatsByNames, sniffFormat } from '../../src/factory/formats/index.js';
import { batchSummaryCsvHeader, batchSummaryCsvLine, jsonFormat } from '../../src/factory/formats/json.js';
import { NVS_KEYS, NVS_MAX_KEY, nvsFormat } from '../../src/factory/formats/nvs.js';
import { TLV_TYPES, crc32, crc32Fallback, tlvFormat } from '../../src/factory/formats/tlv.js';
import { checkStamp, type Stamp } from '../../src/factory/stamp.js';
import { encodePem } from '../../src/pki/pem.js';
import { makePki, makeStamp } from './stamp-fixtures.js';

const pki = makePki();
const stamp = makeStamp(pki, { serial: 'SN-0001' });
const bare = makeStamp(pki, { serial: 'SN 0002/b', withDeviceKey: false, withOnboardingKey: false });
const noChain: Stamp = { ...makeStamp(pki, { serial: 'SN-0003' }), chainDer: [] };

function refused(fn: () => unknown, message: RegExp, code: ErrorCode = 'STAMP_INVALID'): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof HallmarkError, `expected a HallmarkError, got ${err instanceof Error ? err.stack : String(err)}`);
    assert.equal(err.code, code, err.message);
    assert.match(err.message, message);
    return true;
  });
}

describe('every format', () => {
  for (const format of STAMP_FORMATS) {
    test(`${format.name}: encode then decode gives back every field exactly`, () => {
      for (const s of [stamp, bare, noChain]) {
        const data = format.encode(s);
        assert.deepEqual(format.decode(data), s);
        assert.ok(format.encode(s).equals(data), 'encoding is deterministic');
        assert.ok(format.sniff(data), 'recognises its own output');
        assert.equal(sniffFormat(data), format);
        for (const other of STAMP_FORMATS.filter((f) => f !== format)) assert.equal(other.sniff(data), false, `${other.name} does not claim ${format.name}`);
      }
      const decoded = format.decode(format.encode(bare));
      assert.equal('devicePrivateKeyPkcs8' in decoded, false, 'absent keys stay absent (not undefined members)');
      assert.equal('onboardingPrivateKeyPkcs8' in decoded, false);
    });

    test(`${format.name}: refuses to encode an inconsistent stamp`, () => {
      const other = makeStamp(pki);
      refused(() => format.encode({ ...stamp, devicePrivateKeyPkcs8: other.devicePrivateKeyPkcs8 }), /device private key does not match the certificate/);
      refused(() => format.encode({ ...stamp, popSecret: randomBytes(16) }), /QR payload does not match/);
      refused(() => format.encode({ ...stamp, popSecret: Buffer.alloc(8) }), /PoP secret is 8 bytes, under the 16-byte minimum/);
      refused(() => format.encode({ ...stamp, udid: stamp.udid.toUpperCase() }), /UDID/);
      refused(() => format.encode({ ...stamp, certificateDer: Buffer.from('not a certificate') }), /certificate is not a DER certificate/);
      refused(() => format.encode({ ...stamp, company: 'a\nb' }), /company contains a control character/);
    });

    test(`${format.name}: empty and random input is refused`, () => {
      refused(() => format.decode(Buffer.alloc(0)), /./);
      refused(() => format.decode(randomBytes(300)), /./);
    });
  }

  test('formatByName and sniffFormat', () => {
    assert.equal(formatByName('TLV'), tlvFormat);
    assert.deepEqual(formatsByNames('json, nvs,json').map((f) => f.name), ['json', 'nvs']);
    refused(() => formatByName('yaml'), /unknown stamp format "yaml" \(one of json, tlv, nvs\)/, 'BAD_REQUEST');
    refused(() => sniffFormat(Buffer.from('hello')), /not a stamp file/);
    refused(() => sniffFormat(Buffer.from('{"a": 1}')), /not a stamp file/);
  });

  test('extensions tell the formats apart', () => {
    assert.deepEqual(STAMP_FORMATS.map((f) => f.extension), ['.json', '.tlv.bin', '.nvs.csv']);
  });
});

// ---------------------------------------------------------------- tlv

/** Reads the image as docs/stamp-formats.md describes it, independently of the decoder. */
function walkTlv(image: Buffer): { type: number; offset: number; length: number }[] {
  assert.equal(image.subarray(0, 8).toString('latin1'), 'HMSTAMP\0');
  assert.equal(image.readUInt16LE(8), 1);
  assert.equal(image.readUInt16LE(10), 32);
  assert.equal(image.readUInt32LE(16), image.length);
  assert.equal(image.readUInt32LE(28), zlib.crc32(image.subarray(0, 28)) >>> 0);
  const out = [];
  let at = 32;
  for (let i = 0; i < image.readUInt32LE(12); i++) {
    const type = image.readUInt16LE(at);
    const length = image.readUInt32LE(at + 2);
    assert.equal(image.readUInt32LE(at + 6 + length), zlib.crc32(image.subarray(at, at + 6 + length)) >>> 0, `record ${i + 1} CRC`);
    out.push({ type, offset: at, length });
    at += 10 + length;
  }
  assert.equal(at, image.length);
  return out;
}

/** Builds an image from records, per the documented layout (for malformed and extended images). */
function buildTlv(records: { type: number; value: Buffer }[]): Buffer {
  const body = records.map(({ type, value }) => {
    const r = Buffer.alloc(10 + value.length);
    r.writeUInt16LE(type, 0);
    r.writeUInt32LE(value.length, 2);
    value.copy(r, 6);
    r.writeUInt32LE(zlib.crc32(r.subarray(0, 6 + value.length)) >>> 0, 6 + value.length);
    return r;
  });
  const header = Buffer.alloc(32);
  header.write('HMSTAMP\0', 0, 'latin1');
  header.writeUInt16LE(1, 8);
  header.writeUInt16LE(32, 10);
  header.writeUInt32LE(records.length, 12);
  header.writeUInt32LE(32 + body.reduce((n, b) => n + b.length, 0), 16);
  header.writeUInt32LE(zlib.crc32(header.subarray(0, 28)) >>> 0, 28);
  return Buffer.concat([header, ...body]);
}

function recordsOf(image: Buffer): { type: number; value: Buffer }[] {
  return walkTlv(image).map((r) => ({ type: r.type, value: image.subarray(r.offset + 6, r.offset + 6 + r.length) }));
}

describe('tlv', () => {
  const image = tlvFormat.encode(stamp);
  const records = walkTlv(image);
  const certIndex = records.findIndex((r) => r.type === TLV_TYPES.certificate);

  test('the layout is the documented one: header, then type / length / value / CRC32 records', () => {
    assert.deepEqual(records.map((r) => r.type), [0x0001, 0x0002, 0x0003, 0x0004, 0x0005, 0x0010, 0x0011, 0x0011, 0x0020, 0x0030, 0x0031, 0x0032, 0x0040]);
    const cert = records[certIndex]!;
    assert.ok(image.subarray(cert.offset + 6, cert.offset + 6 + cert.length).equals(stamp.certificateDer));
  });

  test('CRC32 is zlib\'s; the fallback table gives the same values', () => {
    assert.equal(crc32(Buffer.from('123456789')), 0xcbf43926);
    assert.equal(crc32Fallback(Buffer.from('123456789')), 0xcbf43926);
    for (let i = 0; i < 20; i++) {
      const data = randomBytes(i * 37);
      assert.equal(crc32Fallback(data), zlib.crc32(data) >>> 0);
    }
  });

  test('one flipped byte inside the certificate record: the error names that record', () => {
    const cert = records[certIndex]!;
    for (const at of [cert.offset + 6, cert.offset + 6 + Math.floor(cert.length / 2), cert.offset + 6 + cert.length - 1, cert.offset + 6 + cert.length]) {
      const bad = Buffer.from(image);
      bad[at]! ^= 0x01;
      refused(() => tlvFormat.decode(bad), new RegExp(`^tlv stamp: record ${certIndex + 1} \\(certificate, type 0x0010, at offset ${cert.offset}\\) fails its CRC32$`));
    }
    // And in another record (the PoP secret), that record.
    const pop = records.findIndex((r) => r.type === TLV_TYPES.popSecret);
    const bad = Buffer.from(image);
    bad[records[pop]!.offset + 7]! ^= 0x80;
    refused(() => tlvFormat.decode(bad), new RegExp(`record ${pop + 1} \\(PoP secret, type 0x0030`));
  });

  test('a flipped byte in the header, or a bad magic or version, is refused', () => {
    const badHeader = Buffer.from(image);
    badHeader[13]! ^= 0x01;
    refused(() => tlvFormat.decode(badHeader), /the header fails its CRC32/);
    const badMagic = Buffer.from(image);
    badMagic[0] = 0x58;
    refused(() => tlvFormat.decode(badMagic), /bad magic/);
    const v2 = Buffer.from(image);
    v2.writeUInt16LE(2, 8);
    v2.writeUInt32LE(zlib.crc32(v2.subarray(0, 28)) >>> 0, 28);
    refused(() => tlvFormat.decode(v2), /format version 2 is not supported/);
  });

  test('every truncation is refused, never a partial stamp', () => {
    for (let n = 0; n < image.length; n++) refused(() => tlvFormat.decode(image.subarray(0, n)), /truncated|shorter/);
  });

  test('size limits: over 1 MiB of input, over 64 KiB of image, too many records', () => {
    refused(() => tlvFormat.decode(Buffer.concat([image, Buffer.alloc(1024 * 1024, 0xff)])), /over the 1048576-byte limit/);
    const huge = Buffer.from(image);
    huge.writeUInt32LE(65 * 1024, 16);
    huge.writeUInt32LE(zlib.crc32(huge.subarray(0, 28)) >>> 0, 28);
    refused(() => tlvFormat.decode(huge), /over the 65536-byte image limit/);
    const many = Buffer.from(image);
    many.writeUInt32LE(1000, 12);
    many.writeUInt32LE(zlib.crc32(many.subarray(0, 28)) >>> 0, 28);
    refused(() => tlvFormat.decode(many), /1000 records, over the limit of 64/);
  });

  test('erased flash (0xff) after the image is ignored; anything else after it is refused', () => {
    assert.deepEqual(tlvFormat.decode(Buffer.concat([image, Buffer.alloc(8192 - image.length, 0xff)])), stamp);
    refused(() => tlvFormat.decode(Buffer.concat([image, Buffer.from([0xff, 0x00])])), /unexpected byte at offset \d+, after the image/);
  });

  test('unknown records: optional types (0x8000 and up) are skipped, others refused', () => {
    const base = recordsOf(image);
    const withOptional = buildTlv([...base.slice(0, 3), { type: 0x8001, value: Buffer.from('future') }, ...base.slice(3)]);
    assert.deepEqual(tlvFormat.decode(withOptional), stamp);
    const withCritical = buildTlv([...base, { type: 0x0050, value: Buffer.from('needed') }]);
    refused(() => tlvFormat.decode(withCritical), /record 14 \(unknown type 0x0050.*is not known to this version and is not marked optional/);
  });

  test('duplicate, missing, and malformed records are refused', () => {
    const base = recordsOf(image);
    refused(() => tlvFormat.decode(buildTlv([...base, base[0]!])), /record 14 \(serial number.*appears a second time/);
    refused(() => tlvFormat.decode(buildTlv(base.filter((r) => r.type !== TLV_TYPES.popSecret))), /no PoP secret record \(type 0x0030\)/);
    refused(() => tlvFormat.decode(buildTlv(base.map((r) => (r.type === TLV_TYPES.certificate ? { ...r, value: Buffer.from('30 82 not DER') } : r)))), /record 6 \(certificate, type 0x0010.*is not a DER certificate/);
    refused(() => tlvFormat.decode(buildTlv(base.map((r) => (r.type === TLV_TYPES.company ? { ...r, value: Buffer.from([0xc3, 0x28]) } : r)))), /company record is not valid UTF-8/);
    const shortLength = buildTlv(base);
    shortLength.writeUInt32LE(0xffffff, records[2]!.offset + 2);
    refused(() => tlvFormat.decode(shortLength), /record 3 \(company.*says 16777215 bytes, past the end of the image/);
    const extra = buildTlv(base);
    const longer = Buffer.concat([extra, Buffer.alloc(4)]);
    longer.writeUInt32LE(extra.length + 4, 16);
    longer.writeUInt32LE(zlib.crc32(longer.subarray(0, 28)) >>> 0, 28);
    refused(() => tlvFormat.decode(longer), /4 bytes after the last record/);
  });
});

// ---------------------------------------------------------------- json

describe('json', () => {
  const data = jsonFormat.encode(stamp);
  const doc = JSON.parse(data.toString('utf8')) as Record<string, unknown>;

  test('one pretty JSON document: PEM certificates and keys, hex PoP secret, stable member order', () => {
    assert.deepEqual(Object.keys(doc), ['format', 'version', 'serialNumber', 'udid', 'company', 'product', 'batch', 'certificate', 'chain', 'devicePrivateKey', 'popSecret', 'onboardingPublicKey', 'onboardingPrivateKey', 'qrPayload']);
    assert.equal(doc.format, 'hallmark-stamp');
    assert.equal(doc.certificate, encodePem('CERTIFICATE', stamp.certificateDer));
    assert.match(doc.devicePrivateKey as string, /^-----BEGIN PRIVATE KEY-----\n/);
    assert.match(doc.onboardingPublicKey as string, /^-----BEGIN PUBLIC KEY-----\n/);
    assert.equal(doc.popSecret, stamp.popSecret.toString('hex'));
    assert.ok(data.toString('utf8').startsWith('{\n  "format": "hallmark-stamp",\n'));
    const bareDoc = JSON.parse(jsonFormat.encode(bare).toString('utf8'));
    assert.equal('devicePrivateKey' in bareDoc, false);
  });

  const variant = (change: (d: Record<string, unknown>) => void): Buffer => {
    const d = structuredClone(doc);
    change(d);
    return Buffer.from(JSON.stringify(d));
  };

  test('malformed json stamps are refused, naming the member', () => {
    refused(() => jsonFormat.decode(data.subarray(0, data.length - 20)), /file is not JSON/);
    refused(() => jsonFormat.decode(Buffer.from([0x7b, 0xff, 0x7d])), /not valid UTF-8/);
    refused(() => jsonFormat.decode(Buffer.from('[1,2]')), /not a JSON object/);
    refused(() => jsonFormat.decode(Buffer.alloc(300 * 1024, 0x20)), /over the 262144-byte limit/);
    refused(() => jsonFormat.decode(variant((d) => { delete d.udid; })), /member "udid" is missing/);
    refused(() => jsonFormat.decode(variant((d) => { d.devicePrivatekey = d.devicePrivateKey; })), /unknown member "devicePrivatekey"/);
    refused(() => jsonFormat.decode(variant((d) => { d.format = 'other'; })), /member "format" is not "hallmark-stamp"/);
    refused(() => jsonFormat.decode(variant((d) => { d.version = 2; })), /stamp version 2 is not supported/);
    refused(() => jsonFormat.decode(variant((d) => { d.popSecret = 'zz'; })), /member "popSecret" is not lower-case hex/);
    refused(() => jsonFormat.decode(variant((d) => { d.serialNumber = 7; })), /member "serialNumber" is not a string/);
    refused(() => jsonFormat.decode(variant((d) => { d.certificate = encodePem('CERTIFICATE', Buffer.from('garbage, not DER')); })), /certificate is not a DER certificate/);
    refused(() => jsonFormat.decode(variant((d) => { d.certificate = (d.certificate as string).slice(0, 100); })), /member "certificate" is not PEM/);
    refused(() => jsonFormat.decode(variant((d) => { d.certificate = encodePem('PUBLIC KEY', stamp.certificateDer); })), /member "certificate" is PEM PUBLIC KEY, expected CERTIFICATE/);
    refused(() => jsonFormat.decode(variant((d) => { d.chain = 'x'; })), /member "chain" is not an array/);
    refused(() => jsonFormat.decode(variant((d) => { d.chain = [1]; })), /member "chain" entry 1 is not a string/);
    refused(() => jsonFormat.decode(variant((d) => { d.devicePrivateKey = encodePem('PRIVATE KEY', randomBytes(100)); })), /device private key is not a PKCS#8 DER private key/);
    refused(() => jsonFormat.decode(variant((d) => { d.qrPayload = 'HM1:AAAA'; })), /QR payload does not match/);
  });

  test('batch summary CSV: header and RFC 4180 quoting', () => {
    const fp = 'ab'.repeat(32);
    assert.equal(batchSummaryCsvHeader(), 'serial_number,udid,certificate_sha256\r\n');
    assert.equal(batchSummaryCsvLine({ serialNumber: 'SN-1', udid: 'aa' }, fp), `SN-1,aa,${fp}\r\n`);
    assert.equal(batchSummaryCsvLine({ serialNumber: 'SN,"1"', udid: 'aa' }, fp), `"SN,""1""",aa,${fp}\r\n`);
    assert.equal(batchSummaryCsvLine({ serialNumber: ' SN', udid: 'aa' }, fp), `" SN",aa,${fp}\r\n`);
    refused(() => batchSummaryCsvLine({ serialNumber: 'SN', udid: 'aa' }, 'AB'), /64 lower-case hex/, 'BAD_REQUEST');
  });
});

// ---------------------------------------------------------------- nvs

describe('nvs', () => {
  const data = nvsFormat.encode(stamp);
  const text = data.toString('utf8');
  const lines = text.trimEnd().split('\n');

  test('the ESP-IDF generator CSV: header, namespace row, keys of at most 15 characters, base64 blobs', () => {
    assert.equal(lines[0], 'key,type,encoding,value');
    assert.equal(lines[1], 'hallmark,namespace,,');
    assert.ok(lines.includes('version,data,u8,1'));
    assert.ok(lines.includes('serial,data,string,SN-0001'));
    assert.ok(lines.includes(`cert,data,base64,${stamp.certificateDer.toString('base64')}`));
    assert.ok(lines.includes('chain_count,data,u8,2'));
    assert.ok(lines.includes(`pop_secret,data,base64,${stamp.popSecret.toString('base64')}`));
    // The product has a comma and quotes: quoted, quotes doubled.
    assert.ok(lines.includes('product,data,string,"Thermostat, ""Pro"" edition"'), lines.join('\n'));
    for (const key of NVS_KEYS.keys()) assert.ok(key.length <= NVS_MAX_KEY, key);
    for (const line of lines.slice(1)) assert.ok(line.split(',')[0]!.length <= 15);
  });

  const replaceLine = (key: string, replacement: string | null): Buffer =>
    Buffer.from(lines.flatMap((l) => (l.startsWith(`${key},`) ? (replacement === null ? [] : [replacement]) : [l])).join('\n') + '\n');

  test('rows in other namespaces are ignored; CRLF line ends and a BOM are read', () => {
    assert.deepEqual(nvsFormat.decode(Buffer.from(text + 'wifi,namespace,,\nssid,data,string,factory-ap\n')), stamp);
    assert.deepEqual(nvsFormat.decode(Buffer.from('\ufeff' + text.replace(/\n/g, '\r\n'))), stamp);
  });

  test('malformed nvs stamps are refused, naming the line or key', () => {
    refused(() => nvsFormat.decode(replaceLine('cert', 'cert,data,base64,AAA$')), /line \d+: the value of "cert" is not base64/);
    refused(() => nvsFormat.decode(replaceLine('cert', 'cert,data,base64,AAA')), /the value of "cert" is not base64/);
    refused(() => nvsFormat.decode(replaceLine('cert', `cert,data,base64,${Buffer.from('not a certificate').toString('base64')}`)), /certificate is not a DER certificate/);
    refused(() => nvsFormat.decode(replaceLine('pop_secret', null)), /key "pop_secret" \(PoP secret \(raw bytes\)\) is missing/);
    refused(() => nvsFormat.decode(replaceLine('udid', 'a_key_of_16_char,data,string,x')), /key "a_key_of_16_char" is not 1-15 characters/);
    refused(() => nvsFormat.decode(replaceLine('udid', 'udidx,data,string,x')), /unknown key "udidx" in namespace "hallmark"/);
    refused(() => nvsFormat.decode(replaceLine('udid', `udid,data,hex2bin,${stamp.udid}`)), /key "udid" has encoding "hex2bin", expected string/);
    refused(() => nvsFormat.decode(replaceLine('udid', `udid,data,string, ${stamp.udid}`)), /leading or trailing white space/);
    refused(() => nvsFormat.decode(replaceLine('udid', `udid,data,string,${stamp.udid},extra`)), /has 5 fields, expected 4/);
    refused(() => nvsFormat.decode(replaceLine('qr', `qr,data,string,"${stamp.qrPayload}`)), /line \d+: a quoted field is not closed \(truncated\?\)/);
    refused(() => nvsFormat.decode(replaceLine('udid', `udid,data,string,"${stamp.udid}"x`)), /text after a closing quote/);
    refused(() => nvsFormat.decode(replaceLine('udid', `udid,data,string,ab"cd`)), /a quote inside an unquoted field/);
    refused(() => nvsFormat.decode(replaceLine('chain_count', 'chain_count,data,u8,1')), /key "chain_1" is beyond chain_count 1/);
    refused(() => nvsFormat.decode(replaceLine('chain_count', 'chain_count,data,u8,300')), /is not a u8/);
    refused(() => nvsFormat.decode(replaceLine('version', 'version,data,u8,2')), /stamp version 2 is not supported/);
    refused(() => nvsFormat.decode(Buffer.from(text + `serial,data,string,SN-0001\n`)), /key "serial" appears a second time \(first on line 4\)/);
    refused(() => nvsFormat.decode(Buffer.from(text.replace('key,type,encoding,value', 'key,type,value'))), /line 1 is not the header/);
    refused(() => nvsFormat.decode(Buffer.from(text.replace('hallmark,namespace,,\n', ''))), /the first row after the header must be a namespace row/);
    refused(() => nvsFormat.decode(Buffer.alloc(300 * 1024, 0x61)), /over the 262144-byte limit/);
    refused(() => nvsFormat.decode(Buffer.from([0x6b, 0xff])), /not valid UTF-8/);
    for (let n = 1; n < 200; n += 7) refused(() => nvsFormat.decode(data.subarray(0, n)), /./);
    // Truncated inside the last rows: a missing key, or a broken base64 / QR value.
    for (let n = data.length - 200; n < data.length - 1; n += 3) refused(() => nvsFormat.decode(data.subarray(0, n)), /./);
  });

  test('refuses to write what NVS cannot carry exactly', () => {
    refused(() => nvsFormat.encode({ ...stamp, company: 'Test Org ' }), /company has leading or trailing white space/);
  });
});

test('checkStamp names the field', () => {
  checkStamp(stamp);
  refused(() => checkStamp({ ...stamp, chainDer: Array.from({ length: 9 }, () => pki.root.certDer) }), /chain has 9 certificates, over the limit of 8/);
  refused(() => checkStamp({ ...stamp, onboardingPublicKeySpki: pki.root.spki }), /onboarding public key is ec, not X25519/);
  refused(() => checkStamp({ ...stamp, serialNumber: '' }), /serial number is missing or empty/);
});
