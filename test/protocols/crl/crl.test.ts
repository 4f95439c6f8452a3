// The CRL encoder and reader (no store): structure, extensions, reasons, size, malformed input; checked
// against @peculiar/x509 and openssl as independent parsers.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { HallmarkError, type ErrorCode } from '../../../src/errors.js';
import { signingSchemeFor } from '../../../src/pki/algorithms.js';
import { keyIdentifier } from '../../../src/pki/extensions.js';
import { encodeNameString } from '../../../src/pki/names.js';
import { seq, smallInteger, tlv } from '../../../src/pki/der.js';
import { CRL_EXT, encodeCrl, parseCrl, verifyCrlSignature, type CrlEntry, type CrlSpec } from '../../../src/protocols/crl/crl.js';
import { loadPeculiarX509, memorySigner, openssl } from '../../pki/fixtures.js';
import { hasCode } from '../../helpers/assertions.js';

const signer = memorySigner('ecdsa-p256');
const ISSUER = encodeNameString('CN=Test Issuing CA,O=Test Org');
const KEY_ID = keyIdentifier(signer.publicKeySpki);
const T0 = new Date('2030-01-02T03:04:05Z');

const spec = (over: Partial<CrlSpec> = {}): CrlSpec => ({
  issuer: ISSUER, issuerKeyId: KEY_ID, scheme: signingSchemeFor('ecdsa-p256'),
  thisUpdate: T0, nextUpdate: new Date(T0.getTime() + 7 * 86_400_000), number: 7, entries: [], ...over,
});
const make = (over: Partial<CrlSpec> = {}): Promise<Buffer> => encodeCrl(spec(over), (tbs) => signer.sign(tbs));


const ENTRIES: CrlEntry[] = [
  { serialHex: '7f01020304050607', revokedAt: new Date('2029-12-31T00:00:00Z'), reason: 'keyCompromise' },
  { serialHex: 'ff00aa', revokedAt: new Date('2029-12-31T00:00:01Z'), reason: 'unspecified' },
  { serialHex: '01', revokedAt: new Date('2029-12-31T00:00:02Z'), reason: 'superseded' },
  { serialHex: '0abc', revokedAt: new Date('2029-12-31T00:00:03Z') },
];

test('a full CRL: v2, issuer, times, cRLNumber, AKI, freshestCRL, entries with reasons; read back by our reader, @peculiar/x509 and openssl', async () => {
  const der = await make({ entries: ENTRIES, freshestCrlUrl: 'http://pki.test/crl/issuing-1-delta.crl' });
  const crl = parseCrl(der);
  assert.equal(crl.version, 2);
  assert.ok(crl.issuer.equals(ISSUER));
  assert.deepEqual([crl.thisUpdate, crl.nextUpdate], [T0, new Date(T0.getTime() + 7 * 86_400_000)]);
  assert.equal(crl.number, 7);
  assert.equal(crl.deltaBase, undefined);
  assert.ok(crl.authorityKeyId?.equals(KEY_ID));
  assert.deepEqual(crl.freshestCrlUrls, ['http://pki.test/crl/issuing-1-delta.crl']);
  assert.deepEqual(crl.entries.map((e) => [e.serialHex, e.revokedAt.toISOString(), e.reason]), [
    ['7f01020304050607', '2029-12-31T00:00:00.000Z', 'keyCompromise'],
    ['ff00aa', '2029-12-31T00:00:01.000Z', 'unspecified'],
    ['01', '2029-12-31T00:00:02.000Z', 'superseded'],
    ['0abc', '2029-12-31T00:00:03.000Z', 'unspecified'],
  ]);
  assert.equal(crl.extensions.get(CRL_EXT.cRLNumber)?.critical, false);
  assert.ok(verifyCrlSignature(crl, signer.publicKeySpki));

  const x509 = await loadPeculiarX509();
  const p = new x509.X509Crl(new Uint8Array(der));
  assert.equal(p.version, 1, 'v2 is encoded as 1');
  assert.equal(p.issuer, 'CN=Test Issuing CA, O=Test Org');
  assert.deepEqual(p.entries.map((e) => [e.serialNumber.toLowerCase(), e.reason]), [
    ['7f01020304050607', x509.X509CrlReason.keyCompromise],
    ['ff00aa', undefined], // unspecified: no reasonCode extension (RFC 5280 §5.3.1)
    ['01', x509.X509CrlReason.superseded],
    ['0abc', undefined],
  ]);
  assert.ok(await p.verify({ publicKey: new x509.PublicKey(new Uint8Array(signer.publicKeySpki)) }), '@peculiar/x509 verifies the signature');

  const text = openssl(['crl', '-inform', 'DER', '-noout', '-text'], der).stdout.toString();
  assert.match(text, /Version 2 \(0x1\)/);
  assert.match(text, /X509v3 CRL Number:\s+7\n/);
  assert.match(text, /X509v3 Authority Key Identifier:/);
  assert.match(text, /X509v3 Freshest CRL:[\s\S]*URI:http:\/\/pki\.test\/crl\/issuing-1-delta\.crl/);
  assert.match(text, /Serial Number: 7F01020304050607\s+Revocation Date: Dec 31 00:00:00 2029 GMT\s+CRL entry extensions:\s+X509v3 CRL Reason Code:\s+Key Compromise/);
  assert.match(text, /Serial Number: FF00AA\s+Revocation Date: Dec 31 00:00:01 2029 GMT\s+Serial Number: 01/, 'no extensions for unspecified');
  assert.match(text, /Superseded/);
  assert.doesNotMatch(text, /Delta CRL Indicator/);
});

test('a delta CRL carries a critical deltaCRLIndicator with its base number', async () => {
  const der = await make({ number: 9, deltaBase: 7, entries: ENTRIES.slice(0, 1) });
  const crl = parseCrl(der);
  assert.deepEqual([crl.number, crl.deltaBase], [9, 7]);
  assert.equal(crl.extensions.get(CRL_EXT.deltaCRLIndicator)?.critical, true);
  const text = openssl(['crl', '-inform', 'DER', '-noout', '-text'], der).stdout.toString();
  assert.match(text, /X509v3 Delta CRL Indicator: critical\s+7\n/);
  assert.match(text, /X509v3 CRL Number:\s+9\n/);
  await assert.rejects(make({ number: 7, deltaBase: 7 }), RangeError, 'a delta builds on an earlier number');
});

test('no revoked certificates: the list is absent (RFC 5280 §5.1.2.6)', async () => {
  const der = await make();
  assert.deepEqual(parseCrl(der).entries, []);
  assert.match(openssl(['crl', '-inform', 'DER', '-noout', '-text'], der).stdout.toString(), /No Revoked Certificates\./);
});

test('10,000 entries encode and parse back (timing reported, not asserted)', async (t) => {
  const at = new Date('2029-06-01T12:00:00Z');
  const reasons = ['keyCompromise', 'superseded', 'unspecified', 'cessationOfOperation'] as const;
  const entries: CrlEntry[] = Array.from({ length: 10_000 }, (_, i) => {
    const serial = randomBytes(16);
    serial[0] = (serial[0]! & 0x7f) | 0x01;
    return { serialHex: serial.toString('hex'), revokedAt: new Date(at.getTime() + (i % 100) * 1000), reason: reasons[i % 4] };
  });
  const started = process.hrtime.bigint();
  const der = await make({ entries });
  const encodeMs = Number(process.hrtime.bigint() - started) / 1e6;
  const parsed = parseCrl(der);
  t.diagnostic(`encode+sign of 10,000 entries: ${encodeMs.toFixed(1)} ms, ${der.length} bytes`);
  assert.equal(parsed.entries.length, 10_000);
  parsed.entries.forEach((e, i) => {
    assert.equal(e.serialHex, entries[i]!.serialHex);
    assert.equal(e.revokedAt.getTime(), entries[i]!.revokedAt.getTime());
    assert.equal(e.reason, entries[i]!.reason);
  });
  assert.ok(verifyCrlSignature(parsed, signer.publicKeySpki));
  // (@peculiar/x509 refuses this many ASN.1 nodes by design: openssl is the independent reader here.)
  const text = openssl(['crl', '-inform', 'DER', '-noout', '-text'], der).stdout.toString();
  assert.equal((text.match(/Serial Number:/g) ?? []).length, 10_000);
});

test('bad entries are refused before signing', async () => {
  await assert.rejects(make({ entries: [{ serialHex: 'xyz', revokedAt: T0 }] }), hasCode('BAD_REQUEST'));
  await assert.rejects(make({ entries: [{ serialHex: 'aa'.repeat(21), revokedAt: T0 }] }), hasCode('BAD_REQUEST'));
  await assert.rejects(make({ entries: [{ serialHex: '01', revokedAt: T0, reason: 'bored' }] }), hasCode('BAD_REQUEST'));
});

test('malformed CRL input is refused with BAD_DER or INPUT_TOO_LARGE', async () => {
  const der = await make({ entries: ENTRIES });
  assert.throws(() => parseCrl(der.subarray(0, der.length - 1)), hasCode('BAD_DER'), 'truncated');
  assert.throws(() => parseCrl(Buffer.concat([der, Buffer.from([0])])), hasCode('BAD_DER'), 'trailing byte');
  assert.throws(() => parseCrl(Buffer.alloc(0)), hasCode('BAD_DER'), 'empty');
  assert.throws(() => parseCrl(randomBytes(64)), (e: unknown) => e instanceof HallmarkError && e.code === 'BAD_DER');
  assert.throws(() => parseCrl(Buffer.from('-----BEGIN X509 CRL-----\n')), hasCode('BAD_DER'), 'PEM is not DER');
  assert.throws(() => parseCrl(der, 100), hasCode('INPUT_TOO_LARGE'));
  // A certificate-shaped structure, a wrong version, a non-critical delta indicator.
  assert.throws(() => parseCrl(seq(seq(smallInteger(5)), seq(), tlv(0x03, Buffer.from([0])))), hasCode('BAD_DER'));
  const tampered = Buffer.from(der);
  const versionAt = tampered.indexOf(Buffer.from([0x02, 0x01, 0x01]));
  tampered[versionAt + 2] = 0x02;
  assert.throws(() => parseCrl(tampered), hasCode('BAD_DER'), 'v3 is no CRL version');
  // A changed byte in the TBS parses but no longer verifies.
  const flipped = Buffer.from(der);
  const serialAt = flipped.indexOf(Buffer.from('7f01020304050607', 'hex'));
  flipped[serialAt + 7] ^= 0x01;
  assert.equal(verifyCrlSignature(parseCrl(flipped), signer.publicKeySpki), false);
});
