import assert from 'node:assert/strict';
import { createPublicKey, randomBytes, sign as cryptoSign } from 'node:crypto';
import { describe, test } from 'node:test';
import { HallmarkError, type ErrorCode } from '../../src/errors.js';
import { SCHEMES, type KeyAlgorithm } from '../../src/pki/algorithms.js';
import { bitString, children, readWhole, seq, TAG } from '../../src/pki/der.js';
import { createCsr, createCsrWith, extensionRequestAttribute, parseCsr, requestedExtensions, verifyCsr } from '../../src/pki/csr.js';
import { EXT, subjectAltName } from '../../src/pki/extensions.js';
import { encodeNameString, nameToString } from '../../src/pki/names.js';
import { SIZE_LIMITS, decodeOne, encodePem } from '../../src/pki/pem.js';
import { NEWKEY_ARGS, generateKey, memorySigner, openssl, opensslCsr, opensslVerifiesCsr, spkiOf } from './fixtures.js';

const hasCode = (...codes: ErrorCode[]) => (err: unknown): boolean => {
  assert.ok(err instanceof HallmarkError, `expected a HallmarkError, got ${err instanceof Error ? err.stack : String(err)}`);
  assert.ok(codes.includes(err.code), `expected ${codes.join(' or ')}, got ${err.code}: ${err.message}`);
  return true;
};

const CSR_LABELS = ['CERTIFICATE REQUEST', 'NEW CERTIFICATE REQUEST'];

const ALGORITHMS = [
  { alg: 'ecdsa-p256', keyType: 'ec', curve: 'prime256v1', scheme: 'ecdsa-with-SHA256' },
  { alg: 'ecdsa-p384', keyType: 'ec', curve: 'secp384r1', scheme: 'ecdsa-with-SHA384' },
  { alg: 'ed25519', keyType: 'ed25519', curve: undefined, scheme: 'Ed25519' },
  { alg: 'rsa-2048', keyType: 'rsa', curve: undefined, scheme: 'sha256WithRSAEncryption' },
] as const;

/** A copy of `der` with one byte XORed. */
function flip(der: Buffer, index: number, mask = 0x01): Buffer {
  const copy = Buffer.from(der);
  copy[index]! ^= mask;
  return copy;
}

/** Rebuilds a CSR from its parts (to swap the algorithm or signature). */
function rebuild(der: Buffer, algorithmIdentifier: Buffer, signature: Buffer): Buffer {
  const root = readWhole(der, TAG.SEQUENCE, 'csr');
  const [info] = children(der, root);
  return seq(der.subarray(info!.start, info!.end), algorithmIdentifier, bitString(signature));
}

const subjectText = 'CN=sensor-0042,O=Acme Devices,C=DE';

for (const { alg, keyType, curve, scheme } of ALGORITHMS) {
  describe(`CSR ${alg}`, () => {
    const { privateKey, publicKey } = generateKey(alg as KeyAlgorithm);
    const ours = createCsr({ subject: encodeNameString(subjectText), privateKey });
    const theirs = opensslCsr(alg, '/CN=sensor-0042/O=Acme Devices/C=DE', ['-addext', 'subjectAltName=DNS:sensor-0042.example,IP:10.1.2.3']);

    test('createCsr output: parses, verifies, carries our subject and key', async () => {
      const csr = parseCsr(ours);
      assert.equal(csr.scheme.name, scheme);
      assert.ok(csr.subject.equals(encodeNameString(subjectText)));
      assert.ok(csr.subjectPublicKeyInfo.equals(spkiOf(publicKey)));
      const key = await verifyCsr(csr);
      assert.equal(key.asymmetricKeyType, keyType);
      if (curve) assert.equal(key.asymmetricKeyDetails?.namedCurve, curve);
    });

    test('createCsr output is accepted by openssl req -verify (independent implementation)', () => {
      assert.ok(opensslVerifiesCsr(ours));
    });

    test('openssl req output: parses, verifies, same subject DER as ours, requested SAN visible', async () => {
      const csr = parseCsr(theirs);
      const key = await verifyCsr(csr);
      assert.equal(key.asymmetricKeyType, keyType);
      assert.ok(csr.subject.equals(encodeNameString(subjectText)), nameToString(csr.subject));
      const ext = requestedExtensions(csr);
      assert.ok(ext.has(EXT.subjectAltName));
    });

    test('openssl req output as PEM goes through decodeOne', async () => {
      const csr = parseCsr(decodeOne(encodePem('CERTIFICATE REQUEST', theirs), CSR_LABELS, SIZE_LIMITS.csr));
      await verifyCsr(csr);
    });

    test('one flipped signature byte -> CSR_SIGNATURE_INVALID', async () => {
      for (const der of [ours, theirs]) {
        // The last byte is always inside the signature value (and keeps the DER well formed).
        await assert.rejects(verifyCsr(parseCsr(flip(der, der.length - 1))), hasCode('CSR_SIGNATURE_INVALID'));
      }
    });

    test('one flipped byte in the signed subject -> CSR_SIGNATURE_INVALID', async () => {
      for (const der of [ours, theirs]) {
        const at = der.indexOf(Buffer.from('sensor-0042'));
        assert.ok(at > 0);
        await assert.rejects(verifyCsr(parseCsr(flip(der, at, 0x20))), hasCode('CSR_SIGNATURE_INVALID'));
      }
    });

    test('truncated anywhere -> BAD_CSR', () => {
      for (const cut of [1, 2, 10, Math.floor(ours.length / 2), ours.length - 1]) {
        assert.throws(() => parseCsr(ours.subarray(0, cut)), hasCode('BAD_CSR'), `cut at ${cut}`);
      }
    });
  });
}

describe('CSR algorithm checks', () => {
  test('a signature algorithm that does not match the key -> CSR_SIGNATURE_INVALID', async () => {
    const { privateKey } = generateKey('ecdsa-p256');
    const der = createCsr({ subject: encodeNameString('CN=x'), privateKey });
    const csr = parseCsr(der);
    const swapped = rebuild(der, SCHEMES.rsaSha256.algorithmIdentifier, csr.signature);
    await assert.rejects(verifyCsr(parseCsr(swapped)), hasCode('CSR_SIGNATURE_INVALID'));
    const asEd = rebuild(der, SCHEMES.ed25519.algorithmIdentifier, csr.signature);
    await assert.rejects(verifyCsr(parseCsr(asEd)), hasCode('CSR_SIGNATURE_INVALID'));
  });

  test('ECDSA with a different hash than the key would use still verifies (P-256 signed with SHA-384)', async () => {
    const { privateKey } = generateKey('ecdsa-p256');
    const p384Scheme = SCHEMES.ecdsaSha384;
    const der = await createCsrWith(encodeNameString('CN=x'), spkiOf(privateKey), p384Scheme, async (data) => cryptoSign('sha384', data, privateKey));
    await verifyCsr(parseCsr(der));
  });

  test('P-521 subject keys (openssl) are accepted', async () => {
    const key = await verifyCsr(parseCsr(opensslCsr('ecdsa-p521', '/CN=big')));
    assert.equal(key.asymmetricKeyDetails?.namedCurve, 'secp521r1');
  });

  test('secp256k1 and RSA-1024 subject keys -> UNSUPPORTED_ALGORITHM', async () => {
    await assert.rejects(verifyCsr(parseCsr(opensslCsr('secp256k1', '/CN=k1'))), hasCode('UNSUPPORTED_ALGORITHM'));
    await assert.rejects(verifyCsr(parseCsr(opensslCsr('rsa-1024', '/CN=small'))), hasCode('UNSUPPORTED_ALGORITHM'));
  });

  test('an unsupported signature algorithm (sha1WithRSAEncryption) -> UNSUPPORTED_ALGORITHM', () => {
    const { privateKey } = generateKey('rsa-2048');
    const der = createCsr({ subject: encodeNameString('CN=x'), privateKey });
    const sha1 = seq(Buffer.from('06092a864886f70d010105', 'hex'), Buffer.from('0500', 'hex'));
    assert.throws(() => parseCsr(rebuild(der, sha1, parseCsr(der).signature)), hasCode('UNSUPPORTED_ALGORITHM'));
  });

  test('a CSR signed through a Signer (createCsrWith) verifies', async () => {
    const signer = memorySigner('ecdsa-p384');
    const der = await createCsrWith(encodeNameString('CN=token'), signer.publicKeySpki, SCHEMES.ecdsaSha384, (d) => signer.sign(d));
    const key = await verifyCsr(parseCsr(der));
    assert.ok(spkiOf(key).equals(signer.publicKeySpki));
  });

  test('extensionRequest attribute round trip', () => {
    const { privateKey } = generateKey('ecdsa-p256');
    const san = subjectAltName({ dns: ['a.example'] });
    const der = createCsr({ subject: encodeNameString('CN=x'), privateKey, attributes: [extensionRequestAttribute([san])] });
    const ext = requestedExtensions(parseCsr(der));
    assert.deepEqual([...ext.keys()], [EXT.subjectAltName]);
    assert.ok(opensslVerifiesCsr(der));
  });
});

describe('malformed and oversize CSRs', () => {
  const { privateKey } = generateKey('ecdsa-p256');
  const good = createCsr({ subject: encodeNameString('CN=x,O=y'), privateKey });

  test('random garbage -> BAD_CSR (or BAD_DER), never another kind of error', () => {
    for (let i = 0; i < 2000; i++) {
      const junk = randomBytes(1 + (i % 300));
      if (i % 2 === 0) junk[0] = 0x30; // half of them look like a SEQUENCE
      assert.throws(() => parseCsr(junk), hasCode('BAD_CSR', 'BAD_DER'), junk.toString('hex'));
    }
  });

  test('a valid CSR with bytes flipped at random: parse+verify fails with a HallmarkError, never a crash', async () => {
    let accepted = 0;
    for (let i = 0; i < 600; i++) {
      const mutated = flip(good, Math.floor(Math.random() * good.length), 1 << Math.floor(Math.random() * 8));
      try {
        await verifyCsr(parseCsr(mutated));
        accepted++;
      } catch (err) {
        hasCode('BAD_CSR', 'BAD_DER', 'CSR_SIGNATURE_INVALID', 'UNSUPPORTED_ALGORITHM')(err);
      }
    }
    // Only a flip that changes nothing signed (e.g. the unused NULL of an algorithm) could still pass.
    assert.ok(accepted <= 10, `${accepted} mutated CSRs verified`);
  });

  test('trailing bytes after the CSR -> BAD_CSR', () => {
    assert.throws(() => parseCsr(Buffer.concat([good, Buffer.from([0])])), hasCode('BAD_CSR'));
  });

  test('a version other than v1 -> BAD_CSR', () => {
    const at = good.indexOf(Buffer.from([0x02, 0x01, 0x00]));
    assert.throws(() => parseCsr(flip(good, at + 2, 0x01)), hasCode('BAD_CSR'));
  });

  test('a certificate handed in as a CSR -> BAD_CSR', () => {
    const cert = openssl(['req', '-x509', ...NEWKEY_ARGS['ecdsa-p256']!, '-nodes', '-keyout', '/dev/null', '-subj', '/CN=not a csr', '-days', '1', '-outform', 'DER']).stdout;
    assert.throws(() => parseCsr(cert), hasCode('BAD_CSR'));
  });

  test(`over ${SIZE_LIMITS.csr} bytes -> INPUT_TOO_LARGE`, () => {
    const big = Buffer.concat([Buffer.from([0x30, 0x83, 0x01, 0x00, 0x00]), Buffer.alloc(0x10000)]);
    assert.throws(() => parseCsr(big), hasCode('INPUT_TOO_LARGE'));
    assert.throws(() => decodeOne(encodePem('CERTIFICATE REQUEST', big), CSR_LABELS, SIZE_LIMITS.csr), hasCode('INPUT_TOO_LARGE'));
  });

  test('the public key object of an openssl RSA CSR matches its SPKI', async () => {
    const der = opensslCsr('rsa-2048', '/CN=rsa');
    const csr = parseCsr(der);
    const key = await verifyCsr(csr);
    assert.ok(createPublicKey({ key: csr.subjectPublicKeyInfo, format: 'der', type: 'spki' }).equals(key));
  });
});
