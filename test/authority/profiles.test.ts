import assert from 'node:assert/strict';
import { X509Certificate as NodeX509 } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { newSerial, signCertificate, signingCa, type CertificateOrder, type SignedCertificate, type SigningCa } from '../../src/authority/certificate-signer.js';
import { PROFILES, PROFILE_NAMES, checkAgainstProfile, profileByName, type CertificateProfile, type ExpectedCertificate } from '../../src/authority/profiles.js';
import { HallmarkError, type ErrorCode } from '../../src/errors.js';
import type { Signer } from '../../src/keys/key-backend.js';
import { SCHEMES } from '../../src/pki/algorithms.js';
import { encodeTbsCertificate, assembleCertificate, parseCertificate, serialToHex } from '../../src/pki/certificate.js';
import { EKU, EXT, extension, keyIdentifier } from '../../src/pki/extensions.js';
import { encodeNameString } from '../../src/pki/names.js';
import { NULL } from '../../src/pki/der.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';
import { generateKey, loadPeculiarX509, memorySigner, opensslText, opensslVerify, spkiOf, writePems } from '../pki/fixtures.js';

const x509 = await loadPeculiarX509();

const hasCode = (code: ErrorCode, message?: RegExp) => (err: unknown): boolean => {
  assert.ok(err instanceof HallmarkError, `expected a HallmarkError, got ${err instanceof Error ? err.stack : String(err)}`);
  assert.equal(err.code, code, `expected ${code}, got ${err.code}: ${err.message}`);
  if (message) assert.match(err.message, message);
  return true;
};

const DAY = 86_400_000;

interface Ca { readonly signer: Signer; readonly subject: Buffer; readonly keyId: Buffer; readonly cert: SignedCertificate; readonly signing: SigningCa }

let tmp: TempDir;
let root: Ca;
let intermediate: Ca;
const deviceKey = generateKey('ecdsa-p256');
const rsaKey = generateKey('rsa-2048');

async function makeRoot(): Promise<Ca> {
  const signer = memorySigner('ecdsa-p256');
  const subject = encodeNameString('CN=Profiles Test Root,O=Acme');
  const keyId = keyIdentifier(signer.publicKeySpki);
  const cert = await signCertificate(signingCa(subject, keyId, signer), { profile: PROFILES.root, subject, subjectPublicKeyInfo: signer.publicKeySpki, subjectKeyKind: 'ecdsa-p256' }, true);
  return { signer, subject, keyId, cert, signing: signingCa(subject, keyId, signer, cert.parsed.notAfter) };
}

async function makeIntermediate(parent: Ca, permittedDns?: string[]): Promise<Ca> {
  const signer = memorySigner('ecdsa-p384');
  const subject = encodeNameString('CN=Profiles Test Issuing,O=Acme');
  const cert = await signCertificate(parent.signing, { profile: PROFILES.intermediate, subject, subjectPublicKeyInfo: signer.publicKeySpki, subjectKeyKind: 'ecdsa-p384', pathLen: 0, permittedDns });
  const keyId = keyIdentifier(signer.publicKeySpki);
  return { signer, subject, keyId, cert, signing: signingCa(subject, keyId, signer, cert.parsed.notAfter) };
}

const order = (profile: CertificateProfile, extra: Partial<CertificateOrder> = {}): CertificateOrder => ({
  profile,
  subject: encodeNameString(`CN=${profile.name} subject,O=Acme`),
  subjectPublicKeyInfo: spkiOf(deviceKey.publicKey),
  subjectKeyKind: 'ecdsa-p256',
  ...extra,
});

/** What signCertificate itself expected of `signed` (the baseline every tampering test departs from). */
function expectationOf(signed: SignedCertificate, issuer: Ca, o: CertificateOrder): ExpectedCertificate {
  return {
    serialHex: signed.serialHex,
    issuer: issuer.subject,
    subject: o.subject,
    subjectPublicKeyInfo: o.subjectPublicKeyInfo,
    notBefore: signed.parsed.notBefore,
    notAfter: signed.parsed.notAfter,
    signatureAlgorithm: issuer.signing.scheme.algorithmIdentifier,
    issuerKeyId: issuer.keyId,
    pathLen: o.profile.ca ? o.pathLen : undefined,
    subjectKeyKind: o.subjectKeyKind,
    altNamesPresent: !!o.altNames,
    nameConstraintsPresent: (o.permittedDns?.length ?? 0) > 0,
  };
}

before(async () => {
  tmp = await makeTempDir('hallmark-profiles-');
  root = await makeRoot();
  intermediate = await makeIntermediate(root);
});
after(() => tmp.cleanup());

function chainVerifies(leaf: Buffer, purpose?: string): void {
  const files = writePems(tmp.path, { root: root.cert.der, int: intermediate.cert.der, leaf });
  const out = opensslVerify(files.root!, files.int!, files.leaf!, ['-x509_strict', ...(purpose ? ['-purpose', purpose] : [])]);
  assert.match(out, /: OK/);
}

function peculiar(der: Buffer) {
  return new x509.X509Certificate(new Uint8Array(der));
}

describe('profiles, as seen by @peculiar/x509 and OpenSSL', () => {
  test('device: clientAuth only, digitalSignature (critical), CA:FALSE (critical), SKI and AKI', async () => {
    const o = order(PROFILES.device);
    const signed = await signCertificate(intermediate.signing, o);
    const p = peculiar(signed.der);
    assert.deepEqual([...p.extensions].map((e) => e.type), [EXT.basicConstraints, EXT.keyUsage, EXT.extKeyUsage, EXT.subjectKeyIdentifier, EXT.authorityKeyIdentifier]);
    const bc = p.getExtension(x509.BasicConstraintsExtension)!;
    assert.equal(bc.critical, true);
    assert.equal(bc.ca, false);
    assert.equal(bc.pathLength, undefined);
    const ku = p.getExtension(x509.KeyUsagesExtension)!;
    assert.equal(ku.critical, true);
    assert.equal(ku.usages, x509.KeyUsageFlags.digitalSignature);
    const eku = p.getExtension(x509.ExtendedKeyUsageExtension)!;
    assert.equal(eku.critical, false);
    assert.deepEqual([...eku.usages], [EKU.clientAuth]);
    assert.equal(p.getExtension(x509.SubjectKeyIdentifierExtension)!.keyId, keyIdentifier(o.subjectPublicKeyInfo).toString('hex'));
    assert.equal(p.getExtension(x509.AuthorityKeyIdentifierExtension)!.keyId, intermediate.keyId.toString('hex'));
    assert.equal(p.getExtension(x509.SubjectAlternativeNameExtension), null);
    assert.equal(signed.parsed.notAfter.getTime() - signed.parsed.notBefore.getTime(), 365 * DAY);

    const text = opensslText(signed.der);
    assert.match(text, /X509v3 Basic Constraints: critical\s+CA:FALSE\n/);
    assert.match(text, /X509v3 Key Usage: critical\s+Digital Signature\n/);
    assert.match(text, /X509v3 Extended Key Usage:\s*\n\s+TLS Web Client Authentication\n/);
    chainVerifies(signed.der, 'sslclient');
    assert.throws(() => chainVerifies(signed.der, 'sslserver'), /certificate purpose/);
  });

  test('device with a SAN carries it (non-critical)', async () => {
    const signed = await signCertificate(intermediate.signing, order(PROFILES.device, { altNames: { uri: ['urn:dev:42'] } }));
    const san = peculiar(signed.der).getExtension(x509.SubjectAlternativeNameExtension)!;
    assert.equal(san.critical, false);
    assert.deepEqual(san.names.toJSON(), [{ type: 'url', value: 'urn:dev:42' }]);
  });

  test('tls-server (EC key): serverAuth, digitalSignature only, SAN with DNS and IP', async () => {
    const signed = await signCertificate(intermediate.signing, order(PROFILES['tls-server'], { altNames: { dns: ['ca.example'], ip: ['127.0.0.1', '::1'] } }));
    const p = peculiar(signed.der);
    assert.deepEqual([...p.getExtension(x509.ExtendedKeyUsageExtension)!.usages], [EKU.serverAuth]);
    assert.equal(p.getExtension(x509.KeyUsagesExtension)!.usages, x509.KeyUsageFlags.digitalSignature);
    assert.deepEqual(p.getExtension(x509.SubjectAlternativeNameExtension)!.names.toJSON(), [
      { type: 'dns', value: 'ca.example' }, { type: 'ip', value: '127.0.0.1' }, { type: 'ip', value: '::1' },
    ]);
    assert.equal(signed.parsed.notAfter.getTime() - signed.parsed.notBefore.getTime(), 397 * DAY);
    chainVerifies(signed.der, 'sslserver');
    const node = new NodeX509(signed.der);
    assert.equal(node.checkHost('ca.example'), 'ca.example');
    assert.equal(node.checkIP('127.0.0.1'), '127.0.0.1');
  });

  test('tls-server (RSA key): digitalSignature and keyEncipherment', async () => {
    const signed = await signCertificate(intermediate.signing, order(PROFILES['tls-server'], {
      subjectPublicKeyInfo: spkiOf(rsaKey.publicKey), subjectKeyKind: 'rsa-2048', altNames: { dns: ['rsa.example'] },
    }));
    assert.equal(peculiar(signed.der).getExtension(x509.KeyUsagesExtension)!.usages, x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyEncipherment);
    chainVerifies(signed.der, 'sslserver');
  });

  test('ocsp-signer: OCSPSigning, digitalSignature, id-pkix-ocsp-nocheck (NULL, non-critical)', async () => {
    const signed = await signCertificate(intermediate.signing, order(PROFILES['ocsp-signer']));
    const p = peculiar(signed.der);
    assert.deepEqual([...p.getExtension(x509.ExtendedKeyUsageExtension)!.usages], [EKU.ocspSigning]);
    assert.equal(p.getExtension(x509.KeyUsagesExtension)!.usages, x509.KeyUsageFlags.digitalSignature);
    const noCheck = p.getExtension(EXT.ocspNoCheck)!;
    assert.equal(noCheck.critical, false);
    assert.equal(Buffer.from(noCheck.value).toString('hex'), '0500');
    assert.equal(p.getExtension(x509.BasicConstraintsExtension)!.ca, false);
    assert.match(opensslText(signed.der), /OCSP No Check/);
    chainVerifies(signed.der);
  });

  test('intermediate: CA:TRUE pathlen 0 (critical), keyCertSign+cRLSign (critical), no EKU, AKI = root SKI', () => {
    const p = peculiar(intermediate.cert.der);
    const bc = p.getExtension(x509.BasicConstraintsExtension)!;
    assert.equal(bc.critical, true);
    assert.equal(bc.ca, true);
    assert.equal(bc.pathLength, 0);
    const ku = p.getExtension(x509.KeyUsagesExtension)!;
    assert.equal(ku.critical, true);
    assert.equal(ku.usages, x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign);
    assert.equal(p.getExtension(x509.ExtendedKeyUsageExtension), null);
    assert.equal(p.getExtension(x509.SubjectKeyIdentifierExtension)!.keyId, intermediate.keyId.toString('hex'));
    assert.equal(p.getExtension(x509.AuthorityKeyIdentifierExtension)!.keyId, root.keyId.toString('hex'));
    assert.equal(p.getExtension(EXT.nameConstraints), null);
    assert.equal(intermediate.cert.parsed.notAfter.getTime() - intermediate.cert.parsed.notBefore.getTime(), 10 * 365 * DAY);
    const files = writePems(tmp.path, { root: root.cert.der, intermediate: intermediate.cert.der });
    assert.match(opensslVerify(files.root!, undefined, files.intermediate!, ['-x509_strict']), /: OK/);
  });

  test('intermediate with permitted DNS subtrees: critical nameConstraints that OpenSSL enforces', async () => {
    const constrained = await makeIntermediate(root, ['fleet.example']);
    const nc = peculiar(constrained.cert.der).getExtension(EXT.nameConstraints)!;
    assert.equal(nc.critical, true);
    const inside = await signCertificate(constrained.signing, order(PROFILES['tls-server'], { altNames: { dns: ['a.fleet.example'] } }));
    const outside = await signCertificate(constrained.signing, order(PROFILES['tls-server'], { altNames: { dns: ['evil.example'] } }));
    const files = writePems(tmp.path, { r: root.cert.der, c: constrained.cert.der, inside: inside.der, outside: outside.der });
    assert.match(opensslVerify(files.r!, files.c!, files.inside!), /: OK/);
    assert.throws(() => opensslVerify(files.r!, files.c!, files.outside!), /name constraint|permitted subtree/i);
  });

  test('root: self-signed, CA:TRUE without pathlen, AKI = SKI, 20 years', async () => {
    const p = peculiar(root.cert.der);
    assert.equal(p.subject, p.issuer);
    const bc = p.getExtension(x509.BasicConstraintsExtension)!;
    assert.equal(bc.ca, true);
    assert.equal(bc.pathLength, undefined);
    assert.equal(p.getExtension(x509.AuthorityKeyIdentifierExtension)!.keyId, p.getExtension(x509.SubjectKeyIdentifierExtension)!.keyId);
    assert.equal(p.getExtension(x509.KeyUsagesExtension)!.usages, x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign);
    assert.ok(new NodeX509(root.cert.der).verify(new NodeX509(root.cert.der).publicKey));
    assert.equal(root.cert.parsed.notAfter.getTime() - root.cert.parsed.notBefore.getTime(), 20 * 365 * DAY);
  });
});

describe('profile violations', () => {
  test('tls-server without a SAN -> PROFILE_VIOLATION', async () => {
    await assert.rejects(signCertificate(intermediate.signing, order(PROFILES['tls-server'])), hasCode('PROFILE_VIOLATION', /subject alternative name/));
    await assert.rejects(signCertificate(intermediate.signing, order(PROFILES['tls-server'], { altNames: { dns: [] } })), hasCode('PROFILE_VIOLATION'));
  });

  test('unknown profile -> UNKNOWN_PROFILE', () => {
    for (const name of ['server', 'Device', '', 'tls_server']) assert.throws(() => profileByName(name), hasCode('UNKNOWN_PROFILE'), name);
    for (const name of PROFILE_NAMES) assert.equal(profileByName(name).name, name);
  });

  test('names inherited from Object.prototype are unknown profiles (constructor, toString and __proto__ were returned as profiles)', () => {
    for (const name of ['constructor', 'toString', '__proto__', 'hasOwnProperty', 'valueOf']) {
      assert.throws(() => profileByName(name), hasCode('UNKNOWN_PROFILE'), name);
    }
  });

  test('validity beyond the profile maximum (or not a positive whole number of days) -> PROFILE_VIOLATION', async () => {
    const cases: Array<[CertificateProfile, number]> = [
      [PROFILES.device, 20 * 365 + 1],
      [PROFILES['tls-server'], 398],
      [PROFILES['ocsp-signer'], 2 * 365 + 1],
      [PROFILES.device, 0],
      [PROFILES.device, -1],
      [PROFILES.device, 1.5],
      [PROFILES.device, Number.NaN],
    ];
    for (const [profile, validityDays] of cases) {
      const o = order(profile, { validityDays, altNames: profile.subjectAltName === 'required' ? { dns: ['x.example'] } : undefined });
      await assert.rejects(signCertificate(intermediate.signing, o), hasCode('PROFILE_VIOLATION'), `${profile.name} ${validityDays}`);
    }
    await assert.rejects(signCertificate(root.signing, order(PROFILES.intermediate, { validityDays: 20 * 365 + 1 })), hasCode('PROFILE_VIOLATION'));
    // The maximum itself is fine.
    const ok = await signCertificate(intermediate.signing, order(PROFILES['tls-server'], { validityDays: 397, altNames: { dns: ['x.example'] } }));
    assert.equal(ok.parsed.notAfter.getTime() - ok.parsed.notBefore.getTime(), 397 * DAY);
  });

  test('SANs where the profile takes none, name constraints on an end entity, bad path lengths -> PROFILE_VIOLATION', async () => {
    await assert.rejects(signCertificate(intermediate.signing, order(PROFILES['ocsp-signer'], { altNames: { dns: ['x.example'] } })), hasCode('PROFILE_VIOLATION'));
    await assert.rejects(signCertificate(root.signing, order(PROFILES.intermediate, { altNames: { dns: ['x.example'] } })), hasCode('PROFILE_VIOLATION'));
    await assert.rejects(signCertificate(intermediate.signing, order(PROFILES.device, { permittedDns: ['x.example'] })), hasCode('PROFILE_VIOLATION'));
    for (const pathLen of [-1, 9, 0.5]) {
      await assert.rejects(signCertificate(root.signing, order(PROFILES.intermediate, { pathLen })), hasCode('PROFILE_VIOLATION'), String(pathLen));
    }
  });

  test('a certificate never outlives its issuer; an expired issuer signs nothing', async () => {
    const shortLived: SigningCa = { ...intermediate.signing, notAfter: new Date(Date.now() + 10 * DAY) };
    const signed = await signCertificate(shortLived, order(PROFILES.device));
    assert.equal(Math.floor(signed.parsed.notAfter.getTime() / 1000), Math.floor(shortLived.notAfter!.getTime() / 1000));
    const expired: SigningCa = { ...intermediate.signing, notAfter: new Date(Date.now() - 1000) };
    await assert.rejects(signCertificate(expired, order(PROFILES.device)), hasCode('CA_NOT_ACTIVE'));
  });
});

describe('checkAgainstProfile: the parse-back check', () => {
  let o: CertificateOrder;
  let signed: SignedCertificate;
  let expected: ExpectedCertificate;
  before(async () => {
    o = order(PROFILES.device, { altNames: { dns: ['d.example'] } });
    signed = await signCertificate(intermediate.signing, o);
    expected = expectationOf(signed, intermediate, o);
  });

  const check = (der: Buffer, exp: ExpectedCertificate = expected, profile: CertificateProfile = PROFILES.device) => () => checkAgainstProfile(profile, parseCertificate(der), exp);

  test('the certificate as issued passes', () => {
    assert.doesNotThrow(check(signed.der));
  });

  test('wrong expectations -> CERTIFICATE_CHECK_FAILED naming the field', () => {
    const other = generateKey('ecdsa-p256');
    const cases: Array<[Partial<ExpectedCertificate>, RegExp]> = [
      [{ serialHex: serialToHex(newSerial()) }, /serial/],
      [{ issuer: encodeNameString('CN=Someone Else') }, /issuer name/],
      [{ subject: encodeNameString('CN=Someone Else') }, /subject name/],
      [{ subjectPublicKeyInfo: spkiOf(other.publicKey) }, /subject public key/],
      [{ notBefore: new Date(expected.notBefore.getTime() + 1000) }, /notBefore/],
      [{ notAfter: new Date(expected.notAfter.getTime() - 1000) }, /notAfter/],
      [{ signatureAlgorithm: SCHEMES.ecdsaSha256.algorithmIdentifier }, /signature algorithm/],
      [{ issuerKeyId: root.keyId }, /authorityKeyIdentifier/],
      [{ altNamesPresent: false }, /unexpected extension 2\.5\.29\.17/],
      [{ nameConstraintsPresent: true }, /missing extension 2\.5\.29\.30/],
    ];
    for (const [change, message] of cases) {
      assert.throws(check(signed.der, { ...expected, ...change }), hasCode('CERTIFICATE_CHECK_FAILED', message), message.source);
    }
  });

  test('checked against another profile -> CERTIFICATE_CHECK_FAILED', () => {
    assert.throws(check(signed.der, expected, PROFILES['tls-server']), hasCode('CERTIFICATE_CHECK_FAILED', /extendedKeyUsage/));
    assert.throws(check(signed.der, expected, PROFILES['ocsp-signer']), hasCode('CERTIFICATE_CHECK_FAILED', /missing extension 1\.3\.6\.1\.5\.5\.7\.48\.1\.5/));
    assert.throws(check(signed.der, { ...expected, pathLen: 0 }, PROFILES.intermediate), hasCode('CERTIFICATE_CHECK_FAILED', /unexpected extension 2\.5\.29\.37/));
  });

  /** A copy of the certificate with `from` (hex, must occur once) replaced by `to`. */
  function tamper(from: string, to: string): Buffer {
    const hex = signed.der.toString('hex');
    const at = hex.indexOf(from);
    assert.ok(at >= 0 && at % 2 === 0 && hex.indexOf(from, at + 1) < 0, `${from} occurs once`);
    return Buffer.from(hex.slice(0, at) + to + hex.slice(at + from.length), 'hex');
  }

  test('tampered certificate bytes -> CERTIFICATE_CHECK_FAILED', () => {
    const ski = keyIdentifier(o.subjectPublicKeyInfo).toString('hex');
    const flippedSki = (parseInt(ski.slice(0, 2), 16) ^ 1).toString(16).padStart(2, '0') + ski.slice(2);
    const cases: Array<[string, string, RegExp]> = [
      ['0603551d0f0101ff', '0603551d0f010100', /keyUsage/], // keyUsage made non-critical
      ['0603551d130101ff', '0603551d13010100', /basicConstraints/], // basicConstraints made non-critical
      ['2b06010505070302', '2b06010505070301', /extendedKeyUsage/], // clientAuth -> serverAuth
      [ski, flippedSki, /subjectKeyIdentifier/],
      [Buffer.from('device subject').toString('hex'), Buffer.from('device subjecT').toString('hex'), /subject name/],
      [signed.serialHex, (signed.serialHex[0] === '7' ? '6' : '7') + signed.serialHex.slice(1), /serial/],
    ];
    for (const [from, to, message] of cases) {
      assert.throws(check(tamper(from, to)), hasCode('CERTIFICATE_CHECK_FAILED', message), message.source);
    }
  });

  test('a duplicated or foreign extension -> CERTIFICATE_CHECK_FAILED', async () => {
    const p = signed.parsed;
    const exts = p.extensionOrder.map((oid) => {
      const e = p.extensions.get(oid)!;
      return extension(oid, e.critical, e.value);
    });
    const rebuild = async (extensions: Buffer[]): Promise<Buffer> => {
      const tbs = encodeTbsCertificate({
        serial: Buffer.from(signed.serialHex, 'hex'), scheme: intermediate.signing.scheme, issuer: intermediate.subject,
        notBefore: p.notBefore, notAfter: p.notAfter, subject: o.subject, subjectPublicKeyInfo: o.subjectPublicKeyInfo, extensions,
      });
      return assembleCertificate(tbs, intermediate.signing.scheme, await intermediate.signer.sign(tbs));
    };
    assert.doesNotThrow(check(await rebuild(exts)));
    assert.throws(check(await rebuild([...exts, exts[1]!])), hasCode('CERTIFICATE_CHECK_FAILED', /duplicate extension/));
    assert.throws(check(await rebuild([...exts, extension('1.2.3.4', false, NULL)])), hasCode('CERTIFICATE_CHECK_FAILED', /unexpected extension 1\.2\.3\.4/));
    assert.throws(check(await rebuild(exts.filter((_, i) => i !== 2))), hasCode('CERTIFICATE_CHECK_FAILED', /missing extension 2\.5\.29\.37/));
  });
});

describe('serial numbers', () => {
  test('1000 serials: distinct, positive, 16 bytes with a non-zero first octet', () => {
    const seen = new Set<string>();
    for (let i = 0; i < 1000; i++) {
      const s = newSerial();
      assert.equal(s.length, 16);
      assert.equal(s[0]! & 0x80, 0, 'top bit clear: positive as a DER INTEGER');
      assert.notEqual(s[0], 0, 'no leading zero octet');
      const hex = serialToHex(s);
      assert.equal(hex.length, 32);
      seen.add(hex);
    }
    assert.equal(seen.size, 1000);
  });

  test('issued certificates carry a 16-octet positive serial without a sign pad', async () => {
    const serials = new Set<string>();
    for (let i = 0; i < 20; i++) {
      const signed = await signCertificate(intermediate.signing, order(PROFILES.device));
      assert.equal(signed.parsed.serialHex.length, 32);
      assert.equal(signed.parsed.serialNegativeOrZero, false);
      assert.equal(signed.parsed.serialHex, signed.serialHex);
      assert.equal(new NodeX509(signed.der).serialNumber.toLowerCase(), signed.serialHex);
      serials.add(signed.serialHex);
    }
    assert.equal(serials.size, 20);
  });
});
