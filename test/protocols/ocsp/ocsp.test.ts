// OCSP wire formats: request parsing and its limits, response encoding read back by an independent
// parser (@peculiar/asn1-ocsp) and by openssl.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createPrivateKey, createPublicKey, randomBytes, sign as cryptoSign, type KeyObject } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AsnConvert, OctetString } from '@peculiar/asn1-schema';
import { OCSPRequest, TBSRequest, Request, CertID } from '@peculiar/asn1-ocsp';
import { AlgorithmIdentifier, Extension } from '@peculiar/asn1-x509';
import type { Signer } from '../../../src/keys/key-backend.js';
import { NULL, ctx, octetString, oid, seq } from '../../../src/pki/der.js';
import {
  OCSP_LIMITS, OCSP_OIDS, certIdFor, encodeOcspRequest, encodeOcspStatusResponse, issuerHashes, nonceBytes, parseOcspRequest,
  parseOcspResponse, responderKeyHash, signOcspResponse, subjectPublicKeyBits, verifyOcspResponse,
} from '../../../src/protocols/ocsp/ocsp.js';
import { decodeGetPath } from '../../../src/protocols/ocsp/routes.js';
import { createTestAuthority } from '../../helpers/authority.js';
import { Authority } from '../../../src/authority/authority.js';
import { decodeOne } from '../../../src/pki/pem.js';

const code = (c: string) => (err: unknown) => (err as { code?: string }).code === c;

test('a request: CertIDs (SHA-1 and SHA-256), serial as the store writes it, nonce as sent', () => {
  const issuer = generateIssuer();
  const a = certIdFor(issuer.der, '00ff01');
  const b = certIdFor(issuer.der, '7f0a', 'sha256', false);
  const nonce = randomBytes(16);
  const parsed = parseOcspRequest(encodeOcspRequest([a, b], nonce));
  assert.equal(parsed.certIds.length, 2);
  const [x, y] = parsed.certIds as [typeof parsed.certIds[0], typeof parsed.certIds[0]];
  assert.equal(x.hashAlgorithm, OCSP_OIDS.sha1);
  assert.equal(x.serialHex, 'ff01');
  assert.deepEqual(x.der, a, 'the CertID re-encodes to what the client sent');
  assert.deepEqual(x.issuerNameHash, issuerHashes(issuer.der).nameHash);
  assert.equal(y.hashAlgorithm, OCSP_OIDS.sha256);
  assert.deepEqual(y.hashAlgorithmDer, seq(oid(OCSP_OIDS.sha256)), 'absent parameters stay absent');
  assert.deepEqual(y.der, b);
  assert.equal(y.issuerKeyHash.length, 32);
  assert.deepEqual(nonceBytes(parsed.nonce!), nonce);
  assert.equal(parsed.signed, false);
});

test('a request built by openssl parses', () => {
  const dir = mkdtempSync(join(tmpdir(), 'hallmark-ocsp-'));
  try {
    const issuer = generateIssuer();
    writeFileSync(join(dir, 'issuer.pem'), issuer.pem);
    execFileSync('openssl', ['ocsp', '-issuer', join(dir, 'issuer.pem'), '-serial', '0x0102030405', '-reqout', join(dir, 'r.der')]);
    const parsed = parseOcspRequest(readFileSync(join(dir, 'r.der')));
    assert.equal(parsed.certIds[0]!.serialHex, '0102030405');
    assert.equal(nonceBytes(parsed.nonce!).length, 16);
    assert.deepEqual(parsed.certIds[0]!.issuerKeyHash, issuerHashes(issuer.der).keyHash);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('malformed requests are refused with a reason', () => {
  const issuer = generateIssuer();
  const id = certIdFor(issuer.der, '01');
  const cases: [string, Buffer, RegExp][] = [
    ['garbage', Buffer.from('not DER at all'), /malformed/],
    ['empty', Buffer.alloc(0), /empty/],
    ['trailing bytes', Buffer.concat([encodeOcspRequest([id]), Buffer.from([0])]), /trailing/],
    ['no CertID', seq(seq(seq())), /empty/],
    ['too many CertIDs', encodeOcspRequest(Array.from({ length: OCSP_LIMITS.certIds + 1 }, () => id)), /CertIDs in one request/],
    ['a nonce over 32 bytes', encodeOcspRequest([id], randomBytes(33)), /nonce of 33 bytes/],
    ['an empty nonce', seq(seq(seq(seq(id)), ctx(2, seq(seq(oid(OCSP_OIDS.nonce), octetString(octetString(Buffer.alloc(0)))))))), /nonce of 0 bytes/],
    ['a critical unknown extension', seq(seq(seq(seq(id)), ctx(2, seq(seq(oid('1.2.3.4'), Buffer.from([0x01, 0x01, 0xff]), octetString(NULL)))))), /critical request extension 1\.2\.3\.4/],
    ['a certificate instead', issuer.der, /not an OCSPRequest|malformed/],
  ];
  for (const [what, der, message] of cases) {
    assert.throws(() => parseOcspRequest(der), (err: Error & { code?: string }) => err.code === 'BAD_REQUEST' && message.test(err.message), what);
  }
  assert.throws(() => parseOcspRequest(Buffer.alloc(OCSP_LIMITS.requestBytes + 1, 0x30)), code('INPUT_TOO_LARGE'));
  // Exactly 32 bytes is fine; so is a raw (not OCTET STRING wrapped) nonce from old clients.
  assert.equal(nonceBytes(parseOcspRequest(encodeOcspRequest([id], randomBytes(32))).nonce!).length, 32);
  const raw = randomBytes(20);
  const oldStyle = seq(seq(seq(seq(id)), ctx(2, seq(seq(oid(OCSP_OIDS.nonce), octetString(raw))))));
  assert.deepEqual(parseOcspRequest(oldStyle).nonce, raw);
  // A negative or zero serial was never issued: it parses, with no serial to look up.
  const zero = seq(seq(oid(OCSP_OIDS.sha1), NULL), octetString(Buffer.alloc(20)), octetString(Buffer.alloc(20)), Buffer.from([0x02, 0x01, 0x00]));
  assert.equal(parseOcspRequest(encodeOcspRequest([zero])).certIds[0]!.serialHex, null);
});

test('a request built with the PeculiarVentures classes parses the same', () => {
  const issuer = generateIssuer();
  const h = issuerHashes(issuer.der);
  const req = new OCSPRequest({
    tbsRequest: new TBSRequest({
      requestList: [new Request({ reqCert: new CertID({ hashAlgorithm: new AlgorithmIdentifier({ algorithm: OCSP_OIDS.sha1, parameters: null }), issuerNameHash: new OctetString(h.nameHash), issuerKeyHash: new OctetString(h.keyHash), serialNumber: new Uint8Array([0x12, 0x34]).buffer }) })],
      requestExtensions: [new Extension({ extnID: OCSP_OIDS.nonce, extnValue: new OctetString(octetString(Buffer.from('0123456789abcdef'))) })],
    }),
  });
  const parsed = parseOcspRequest(Buffer.from(AsnConvert.serialize(req)));
  assert.equal(parsed.certIds[0]!.serialHex, '1234');
  assert.equal(nonceBytes(parsed.nonce!).toString(), '0123456789abcdef');
});

test('a signed response reads back (peculiar), verifies, and openssl reads it', async () => {
  const issuer = generateIssuer();
  const responder = responderFor(issuer);
  const certId = certIdFor(issuer.der, '0a0b');
  const revokedId = certIdFor(issuer.der, '0c');
  const now = new Date(Math.floor(Date.now() / 1000) * 1000);
  const next = new Date(now.getTime() + 86_400_000);
  const at = new Date(now.getTime() - 3600_000);
  const nonce = octetString(randomBytes(16));
  const der = await signOcspResponse(responder.identity, {
    producedAt: now,
    nonce,
    responses: [
      { certIdDer: certId, status: { kind: 'good' }, thisUpdate: now, nextUpdate: next },
      { certIdDer: revokedId, status: { kind: 'revoked', at, reason: 1 }, thisUpdate: now, nextUpdate: next },
      { certIdDer: certIdFor(issuer.der, '0d'), status: { kind: 'unknown' }, thisUpdate: now },
    ],
  });
  const parsed = parseOcspResponse(der);
  assert.equal(parsed.status, 'successful');
  const b = parsed.basic!;
  assert.deepEqual(b.responderKeyHash, responderKeyHash(responder.certSpki));
  assert.equal(b.producedAt.getTime(), now.getTime());
  assert.deepEqual(b.responses.map((r) => [r.serialHex, r.status]), [['0a0b', 'good'], ['0c', 'revoked'], ['0d', 'unknown']]);
  assert.equal(b.responses[1]!.revocationTime!.getTime(), at.getTime());
  assert.equal(b.responses[1]!.revocationReason, 1);
  assert.equal(b.responses[0]!.nextUpdate!.getTime(), next.getTime());
  assert.equal(b.responses[2]!.nextUpdate, undefined);
  assert.deepEqual(b.nonce, nonce);
  assert.equal(b.certificates.length, 2);
  verifyOcspResponse(parsed, issuer.der);
  // A flipped byte in the signed data does not verify.
  const tampered = Buffer.from(der);
  const i = tampered.indexOf(Buffer.from(b.responses[0]!.issuerNameHash)) + 3;
  tampered[i] ^= 1;
  assert.throws(() => verifyOcspResponse(parseOcspResponse(tampered), issuer.der));

  const dir = mkdtempSync(join(tmpdir(), 'hallmark-ocsp-'));
  try {
    writeFileSync(join(dir, 'resp.der'), der);
    writeFileSync(join(dir, 'issuer.pem'), issuer.pem);
    const text = execFileSync('openssl', ['ocsp', '-respin', join(dir, 'resp.der'), '-resp_text', '-noverify'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    assert.match(text, /Cert Status: good/);
    assert.match(text, /Cert Status: revoked[\s\S]*Revocation Reason: keyCompromise \(0x1\)/);
    assert.match(text, /Cert Status: unknown/);
    assert.match(text, /OCSP Nonce/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('error statuses are a bare OCSPResponse', () => {
  for (const [name, n] of [['malformedRequest', 1], ['internalError', 2], ['tryLater', 3], ['sigRequired', 5], ['unauthorized', 6]] as const) {
    const der = encodeOcspStatusResponse(name);
    assert.deepEqual(der, Buffer.from([0x30, 0x03, 0x0a, 0x01, n]));
    assert.equal(parseOcspResponse(der).status, name);
  }
});

test('GET paths: URL-encoded or not, standard or URL-safe base64; anything else is not a request', () => {
  const der = Buffer.from([0x30, 0xfb, 0xff, 0x3e, 0x00]);
  const b64 = der.toString('base64');
  assert.ok(/[+/]/.test(b64));
  assert.deepEqual(decodeGetPath(b64), der);
  assert.deepEqual(decodeGetPath(encodeURIComponent(b64)), der);
  assert.deepEqual(decodeGetPath(der.toString('base64url')), der);
  assert.equal(decodeGetPath('not*base64'), undefined);
  assert.equal(decodeGetPath('%zz'), undefined);
  assert.equal(decodeGetPath(''), undefined);
});

test('issuer hashes of a real issuing CA match what openssl puts in a CertID', async () => {
  const t = await createTestAuthority();
  try {
    const authority = await Authority.open(t.home, t.passphrase);
    try {
      const [der] = await authority.caChain('issuing-1', false);
      const out = execFileSync('openssl', ['ocsp', '-issuer', t.intermediatePem, '-serial', '0x01', '-no_nonce', '-req_text', '-reqout', join(t.dir, 'r.der')], { encoding: 'utf8' });
      const h = issuerHashes(der!);
      assert.match(out, new RegExp(`Issuer Name Hash: ${h.nameHash.toString('hex').toUpperCase()}`));
      assert.match(out, new RegExp(`Issuer Key Hash: ${h.keyHash.toString('hex').toUpperCase()}`));
      assert.deepEqual(der, decodeOne(readFileSync(t.intermediatePem, 'utf8'), ['CERTIFICATE'], 1 << 16));
    } finally {
      await authority.close();
    }
  } finally {
    await t.cleanup();
  }
});

// ------------------------------------------------------------ helpers: a throw-away CA and signer made with openssl

function generateIssuer(): { der: Buffer; pem: string; key: KeyObject } {
  const dir = mkdtempSync(join(tmpdir(), 'hallmark-ocsp-ca-'));
  try {
    execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', join(dir, 'k.pem'), '-subj', '/CN=Wire Test CA', '-days', '2', '-out', join(dir, 'c.pem')], { stdio: 'ignore' });
    const pem = readFileSync(join(dir, 'c.pem'), 'utf8');
    return { der: decodeOne(pem, ['CERTIFICATE'], 1 << 16), pem, key: createPrivateKey(readFileSync(join(dir, 'k.pem'))) };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The issuer itself as responder (RFC 6960 allows the CA to sign): enough to exercise encoding and verification. */
function responderFor(issuer: ReturnType<typeof generateIssuer>) {
  const spki = createPublicKey(issuer.key).export({ type: 'spki', format: 'der' });
  const signer: Signer = {
    ref: { backend: 'file', id: 'test', algorithm: 'ecdsa-p256' },
    publicKeySpki: spki,
    sign: async (data: Buffer) => cryptoSign('sha256', data, issuer.key),
  };
  assert.ok(subjectPublicKeyBits(spki).length === 65);
  return { identity: { signer, certificates: [issuer.der, issuer.der], keyHash: responderKeyHash(spki) }, certSpki: spki };
}
