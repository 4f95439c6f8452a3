import assert from 'node:assert/strict';
import { generateKeyPairSync, randomBytes, sign as nodeSign, verify as nodeVerify } from 'node:crypto';
import { after, before, describe, test, type TestContext } from 'node:test';
import pkcs11js from 'pkcs11js';
import { HallmarkError, type ErrorCode } from '../../src/errors.js';
import { KEY_ALGORITHMS, keyAlgorithmOf, publicKeyFromSpki, signingSchemeFor, type KeyAlgorithm } from '../../src/pki/algorithms.js';
import { ecdsaDerToRaw, ecdsaRawToDer } from '../../src/pki/ecdsa-signature.js';
import type { KeyRef } from '../../src/keys/key-backend.js';
import { Pkcs11KeyBackend, formatPkcs11Uri, parsePkcs11Uri } from '../../src/keys/pkcs11-backend.js';
import { createSoftHsmToken, softHsmAvailable, type SoftHsmToken } from '../helpers/softhsm.js';
import { hasCode } from '../helpers/assertions.js';

const SOFTHSM_MISSING = 'softhsm2 not installed: apt-get install softhsm2';
const available = softHsmAvailable();

/** In CI a missing SoftHSM is a failure (the PKCS#11 backend would go untested); locally a skip. */
function requireSoftHsm(t: TestContext): boolean {
  if (available) return true;
  if (process.env.CI === 'true') assert.fail(`softhsm2 is missing on this CI runner (${SOFTHSM_MISSING}); the PKCS#11 backend cannot be tested`);
  t.skip(SOFTHSM_MISSING);
  return false;
}


function verifies(alg: KeyAlgorithm, spki: Buffer, data: Buffer, signature: Buffer): boolean {
  return nodeVerify(signingSchemeFor(alg).hash, data, publicKeyFromSpki(spki), signature);
}

// ---------------------------------------------------------------- ECDSA encodings (no token needed)

describe('ecdsaRawToDer / ecdsaDerToRaw', () => {
  for (const [namedCurve, size, hash] of [['P-256', 32, 'sha256'], ['P-384', 48, 'sha384']] as const) {
    test(`${namedCurve}: round trip against Node's DER and P1363 encodings`, () => {
      const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve });
      // Enough signatures that r or s with a high bit (0x00 pad) and with leading zero bytes occur.
      for (let i = 0; i < 300; i++) {
        const data = randomBytes(16);
        const der = nodeSign(hash, data, { key: privateKey, dsaEncoding: 'der' });
        const raw = ecdsaDerToRaw(der, size);
        assert.equal(raw.length, 2 * size);
        assert.ok(nodeVerify(hash, data, { key: publicKey, dsaEncoding: 'ieee-p1363' }, raw));
        assert.deepEqual(ecdsaRawToDer(raw), der);
      }
    });
  }

  test('encodes minimal INTEGERs: a 0x00 pad for a high bit, no leading zero bytes', () => {
    const r = Buffer.alloc(32, 0); r[0] = 0x80; r[31] = 1;
    const s = Buffer.alloc(32, 0); s[31] = 0x05; // s = 5
    const der = ecdsaRawToDer(Buffer.concat([r, s]));
    assert.equal(der.toString('hex'), '3026' + '0221' + '00' + r.toString('hex') + '020105');
    assert.deepEqual(ecdsaDerToRaw(der, 32), Buffer.concat([r, s]));
  });

  test('rejects malformed raw signatures with BAD_DER', () => {
    for (const raw of [Buffer.alloc(0), Buffer.alloc(63, 1), Buffer.alloc(134, 1), Buffer.concat([Buffer.alloc(32), Buffer.alloc(32, 1)]), Buffer.concat([Buffer.alloc(32, 1), Buffer.alloc(32)])]) {
      assert.throws(() => ecdsaRawToDer(raw), hasCode('BAD_DER'), `raw of ${raw.length} bytes`);
    }
  });

  test('rejects malformed DER signatures with BAD_DER', () => {
    const cases: Record<string, string> = {
      'empty': '',
      'not a SEQUENCE': '3106020101020101',
      'trailing bytes': '300602010102010100',
      'truncated': '30060201010201',
      'one INTEGER': '3003020101',
      'three INTEGERs': '3009020101020101020101',
      'OCTET STRING instead of INTEGER': '3006040101020101',
      'non-minimal INTEGER': '300702020001020101',
      'negative INTEGER': '3006020180020101',
      'empty INTEGER': '30050200020101',
      'zero r': '3006020100020101',
      'r longer than the field': '3026022101' + 'ff'.repeat(32) + '020101',
    };
    for (const [name, hex] of Object.entries(cases)) {
      assert.throws(() => ecdsaDerToRaw(Buffer.from(hex, 'hex'), 32), hasCode('BAD_DER'), name);
    }
    assert.throws(() => ecdsaDerToRaw(Buffer.from('3006020101020101', 'hex'), 0), RangeError);
  });
});

// ---------------------------------------------------------------- RFC 7512 URIs (no token needed)

describe('PKCS#11 URIs', () => {
  test('format follows RFC 7512 percent-encoding', () => {
    assert.equal(
      formatPkcs11Uri({ token: 'My Token', id: Buffer.from([0xab, 0xcd, 0x01]), object: 'a;b=c/d?' }),
      'pkcs11:token=My%20Token;id=%ab%cd%01;object=a%3Bb%3Dc%2Fd%3F',
    );
  });

  test('round trip with special characters in labels', () => {
    const labels = ['plain', 'with space', 'semi;colon', 'eq=ual', 'pct%41', 'slash/quest?hash#amp&', 'quote"\'()*+,:@[]!$', 'ünïcødé 根 🔑', ' lead and trail ', ''];
    for (const token of labels) {
      for (const object of labels) {
        const id = randomBytes(16);
        const uri = formatPkcs11Uri({ token, id, object });
        assert.match(uri, /^pkcs11:[^?#]*$/, 'no raw ? or # in the path');
        const parsed = parsePkcs11Uri(uri);
        assert.equal(parsed.token, token);
        assert.equal(parsed.object, object);
        assert.deepEqual(parsed.id, id);
      }
    }
  });

  test('parses the RFC 7512 example and ignores query attributes', () => {
    const parsed = parsePkcs11Uri('PKCS11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;model=1.0;object=my-certificate;type=cert;id=%69%95%3E%5c%F4%BD%EC%91;serial=?pin-value=secret&module-path=/evil.so');
    assert.equal(parsed.token, 'The Software PKCS#11 Softtoken');
    assert.equal(parsed.object, 'my-certificate');
    assert.equal(parsed.type, 'cert');
    assert.equal(parsed.id?.toString('hex'), '69953e5cf4bdec91');
    assert.equal(parsed.attributes.get('manufacturer'), 'Snake Oil, Inc.');
    assert.equal(parsed.attributes.get('serial'), '');
    assert.equal(parsed.attributes.has('pin-value'), false);
  });

  test('rejects malformed URIs with BAD_REQUEST', () => {
    for (const uri of ['', 'https://example.com', 'pkcs11:id=%zz', 'pkcs11:id=%1', 'pkcs11:id=%01;id=%02', 'pkcs11:object', 'pkcs11:=x', 'pkcs11:object=%ff', 'pkcs11:id=%01;']) {
      assert.throws(() => parsePkcs11Uri(uri), hasCode('BAD_REQUEST'), uri);
    }
  });
});

// ---------------------------------------------------------------- the backend against SoftHSM2

test('softhsm2 is installed (required when CI=true)', (t) => {
  if (!requireSoftHsm(t)) return;
  assert.ok(available);
});

describe('Pkcs11KeyBackend on SoftHSM2', () => {
  let tokenA: SoftHsmToken;
  let tokenB: SoftHsmToken;
  let backend: Pkcs11KeyBackend;
  const generated = new Map<KeyAlgorithm, { ref: KeyRef; spki: Buffer }>();
  const openA = () => Pkcs11KeyBackend.open({ module: tokenA.module, token: tokenA.token, pin: tokenA.pin });

  before(async () => {
    if (!available) return;
    // Both tokens first: SoftHSM2 only sees tokens that exist when the module is initialised.
    tokenA = await createSoftHsmToken('Hallmark CA; "test" token');
    tokenB = await createSoftHsmToken();
    backend = await openA();
  });

  after(async () => {
    if (!available) return;
    await backend?.close();
    await tokenB?.cleanup();
    await tokenA?.cleanup();
  });

  for (const alg of KEY_ALGORITHMS) {
    test(`${alg}: generate, sign, verify with node:crypto`, async (t) => {
      if (!requireSoftHsm(t)) return;
      const label = `issuing CA ${alg} / 2025;ü`;
      const ref = await backend.generateKey(label, alg);
      assert.equal(ref.backend, 'pkcs11');
      assert.equal(ref.algorithm, alg);
      const uri = parsePkcs11Uri(ref.id);
      assert.equal(uri.token, tokenA.token);
      assert.equal(uri.object, label);
      assert.equal(uri.id?.length, 16);

      const signer = await backend.signer(ref);
      assert.deepEqual(signer.ref, ref);
      assert.equal(keyAlgorithmOf(publicKeyFromSpki(signer.publicKeySpki)), alg);

      for (const data of [Buffer.from('tbsCertificate bytes'), randomBytes(3000), Buffer.alloc(0)]) {
        const signature = await signer.sign(data);
        assert.ok(verifies(alg, signer.publicKeySpki, data, signature), `${alg} signature verifies`);
        assert.equal(verifies(alg, signer.publicKeySpki, Buffer.concat([data, Buffer.from('x')]), signature), false);
        if (alg.startsWith('ecdsa')) ecdsaDerToRaw(signature, alg === 'ecdsa-p256' ? 32 : 48); // DER, not raw
      }
      generated.set(alg, { ref, spki: signer.publicKeySpki });
    });
  }

  test('private keys are sensitive and cannot be extracted', async (t) => {
    if (!requireSoftHsm(t)) return;
    assert.equal(generated.size, KEY_ALGORITHMS.length);
    for (const [alg, { ref }] of generated) {
      const info = await backend.keyInfo(ref);
      assert.equal(info.algorithm, alg);
      assert.equal(info.sensitive, true);
      assert.equal(info.extractable, false);
      assert.equal(info.alwaysSensitive, true);
      assert.equal(info.neverExtractable, true);
    }
    // Ask the token directly, through a separate session, for a private value.
    const raw = new pkcs11js.PKCS11();
    raw.load(tokenA.module); // same library, already initialised and logged in by the backend
    const slot = raw.C_GetSlotList(true).find((s) => raw.C_GetTokenInfo(s).label.trimEnd() === tokenA.token);
    assert.ok(slot);
    const session = raw.C_OpenSession(slot, pkcs11js.CKF_SERIAL_SESSION);
    try {
      for (const [alg, { ref }] of generated) {
        raw.C_FindObjectsInit(session, [{ type: pkcs11js.CKA_CLASS, value: pkcs11js.CKO_PRIVATE_KEY }, { type: pkcs11js.CKA_ID, value: parsePkcs11Uri(ref.id).id! }]);
        const handle = raw.C_FindObjects(session);
        raw.C_FindObjectsFinal(session);
        assert.ok(handle, `${alg} private key found`);
        const secret = alg.startsWith('rsa') ? pkcs11js.CKA_PRIVATE_EXPONENT : pkcs11js.CKA_VALUE;
        assert.throws(() => raw.C_GetAttributeValue(session, handle, [{ type: secret }]), /CKR_ATTRIBUTE_SENSITIVE/, alg);
      }
    } finally {
      raw.C_CloseSession(session);
    }
  });

  test('a key destroyed under a live signer is KEY_NOT_FOUND and the session keeps working', async (t) => {
    if (!requireSoftHsm(t)) return;
    const doomed = await backend.generateKey('doomed', 'ecdsa-p256');
    const signer = await backend.signer(doomed);
    const raw = new pkcs11js.PKCS11();
    raw.load(tokenA.module);
    const slot = raw.C_GetSlotList(true).find((s) => raw.C_GetTokenInfo(s).label.trimEnd() === tokenA.token)!;
    const session = raw.C_OpenSession(slot, pkcs11js.CKF_SERIAL_SESSION | pkcs11js.CKF_RW_SESSION);
    try {
      raw.C_FindObjectsInit(session, [{ type: pkcs11js.CKA_ID, value: parsePkcs11Uri(doomed.id).id! }]);
      const handles = raw.C_FindObjects(session, 10);
      raw.C_FindObjectsFinal(session);
      assert.equal(handles.length, 2, 'public and private object share the CKA_ID');
      for (const h of handles) raw.C_DestroyObject(session, h);
    } finally {
      raw.C_CloseSession(session);
    }
    await assert.rejects(signer.sign(Buffer.from('x')), hasCode('KEY_NOT_FOUND'));
    await assert.rejects(backend.signer(doomed), hasCode('KEY_NOT_FOUND'));
    const { ref, spki } = generated.get('ecdsa-p384')!;
    const data = Buffer.from('still fine');
    assert.ok(verifies('ecdsa-p384', spki, data, await (await backend.signer(ref)).sign(data)));
  });

  test('concurrent signatures on one session are serialised and all verify', async (t) => {
    if (!requireSoftHsm(t)) return;
    const signers = await Promise.all([...generated.values()].map(({ ref }) => backend.signer(ref)));
    const jobs = Array.from({ length: 40 }, (_, i) => {
      const signer = signers[i % signers.length]!;
      const data = randomBytes(64);
      return signer.sign(data).then((sig) => verifies(signer.ref.algorithm, signer.publicKeySpki, data, sig));
    });
    assert.deepEqual(await Promise.all(jobs), jobs.map(() => true));
  });

  test('references that name no key are KEY_NOT_FOUND', async (t) => {
    if (!requireSoftHsm(t)) return;
    const p256 = generated.get('ecdsa-p256')!.ref;
    const unknownId = formatPkcs11Uri({ token: tokenA.token, id: randomBytes(16), object: 'nobody' });
    await assert.rejects(backend.signer({ backend: 'pkcs11', id: unknownId, algorithm: 'ecdsa-p256' }), hasCode('KEY_NOT_FOUND'));
    // Same id, but the URI names another token.
    const otherToken = formatPkcs11Uri({ token: tokenB.token, id: parsePkcs11Uri(p256.id).id! });
    await assert.rejects(backend.signer({ ...p256, id: otherToken }), hasCode('KEY_NOT_FOUND'));
    // The id is authoritative: a matching label without an id finds nothing.
    await assert.rejects(backend.signer({ ...p256, id: formatPkcs11Uri({ token: tokenA.token, object: 'issuing CA ecdsa-p256 / 2025;ü' }) }), hasCode('KEY_NOT_FOUND'));
    // A reference whose algorithm disagrees with the key on the token.
    await assert.rejects(backend.signer({ ...p256, algorithm: 'ecdsa-p384' }), hasCode('KEY_NOT_FOUND'));
    await assert.rejects(backend.signer({ ...p256, backend: 'file' }), hasCode('KEY_NOT_FOUND'));
  });

  test('a wrong PIN is BAD_PASSPHRASE and the PIN never appears in the error', async (t) => {
    if (!requireSoftHsm(t)) return;
    const wrongPin = 'not-the-pin-' + randomBytes(4).toString('hex');
    const notLeaking = (err: unknown): boolean => {
      hasCode('BAD_PASSPHRASE')(err);
      const text = `${(err as Error).message} ${(err as Error).stack ?? ''} ${String((err as Error).cause ?? '')}`;
      assert.ok(!text.includes(wrongPin), 'PIN must not appear in the error');
      return true;
    };
    // Token B has no open backend: the token itself rejects the PIN (CKR_PIN_INCORRECT).
    await assert.rejects(Pkcs11KeyBackend.open({ module: tokenB.module, token: tokenB.token, pin: wrongPin }), notLeaking);
    // Token A is already logged in by `backend`: the PIN is checked against the one that logged in.
    await assert.rejects(Pkcs11KeyBackend.open({ module: tokenA.module, token: tokenA.token, pin: wrongPin }), notLeaking);
    // The right PIN still works after the failures.
    const b = await Pkcs11KeyBackend.open({ module: tokenB.module, token: tokenB.token, pin: tokenB.pin });
    await b.close();
  });

  test('an unknown token label is KEY_BACKEND_FAILED naming the available tokens', async (t) => {
    if (!requireSoftHsm(t)) return;
    await assert.rejects(Pkcs11KeyBackend.open({ module: tokenA.module, token: 'no such token', pin: '1234' }), (err: unknown) => {
      hasCode('KEY_BACKEND_FAILED')(err);
      assert.match((err as Error).message, /no PKCS#11 token labelled "no such token"/);
      return true;
    });
  });

  test('two backends on one token share the login; closing one leaves the other working', async (t) => {
    if (!requireSoftHsm(t)) return;
    const { ref, spki } = generated.get('ed25519')!;
    const second = await openA();
    const viaSecond = await second.signer(ref);
    assert.deepEqual(viaSecond.publicKeySpki, spki);
    const data = Buffer.from('hello');
    assert.ok(verifies('ed25519', spki, data, await viaSecond.sign(data)));
    await second.close();
    await second.close(); // idempotent
    await assert.rejects(viaSecond.sign(data), hasCode('KEY_BACKEND_FAILED'));
    // `backend` is still logged in: C_Logout was not issued while it remained open.
    const viaFirst = await backend.signer(ref);
    assert.ok(verifies('ed25519', spki, data, await viaFirst.sign(data)));
  });

  test('keys persist: a reopened backend finds every key by its URI', async (t) => {
    if (!requireSoftHsm(t)) return;
    await backend.close(); // last user: logs out and finalises the module
    await backend.close();
    await assert.rejects(backend.generateKey('late', 'ecdsa-p256'), hasCode('KEY_BACKEND_FAILED'));
    backend = await openA(); // C_Initialize again in the same process
    for (const [alg, { ref, spki }] of generated) {
      const signer = await backend.signer(ref);
      assert.deepEqual(signer.publicKeySpki, spki, `${alg} public key unchanged`);
      const data = randomBytes(100);
      assert.ok(verifies(alg, spki, data, await signer.sign(data)), `${alg} signs after reopen`);
    }
  });
});
