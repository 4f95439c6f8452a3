// Certificate profiles: what each kind of certificate must contain. The same definition drives
// the encoder (extensionsFor) and the independent parse-back check (checkAgainstProfile), so a
// certificate that leaves the authority provably matches its profile.

import { HallmarkError } from '../errors.js';
import type { KeyAlgorithm } from '../pki/algorithms.js';
import { serialToHex, type ParsedCertificate } from '../pki/certificate.js';
import {
  EKU, EXT, authorityKeyIdentifier, basicConstraints, decodeAuthorityKeyId, decodeBasicConstraints, decodeKeyUsage,
  authorityInfoAccess, crlDistributionPoints, extension, decodeOidSequence, decodeStationManifestDigest, decodeSubjectKeyId, extKeyUsage, stationManifestExtension, keyIdentifier, keyUsage, nameConstraints, ocspNoCheck,
  subjectAltName, subjectKeyIdentifier, type AltNames, type KeyUsage,
} from '../pki/extensions.js';

export const PROFILE_NAMES = ['root', 'intermediate', 'ocsp-signer', 'tls-server', 'device'] as const;
export type ProfileName = (typeof PROFILE_NAMES)[number];

export interface CertificateProfile {
  readonly name: ProfileName;
  readonly ca: boolean;
  /** Key usages for a subject key of this algorithm. */
  keyUsage(subjectKey: KeyAlgorithm | 'other-rsa' | 'other-ec'): KeyUsage[];
  readonly extendedKeyUsage: readonly string[];
  readonly ocspNoCheck: boolean;
  readonly subjectAltName: 'required' | 'optional' | 'none';
  readonly defaultValidityDays: number;
  readonly maxValidityDays: number;
  /** Issued by the offline root (and so only through the ceremony). */
  readonly signedByRoot: boolean;
}

const caUsages = (): KeyUsage[] => ['keyCertSign', 'cRLSign'];
// RSA keys may also carry keyEncipherment for TLS 1.2 RSA key exchange; EC / Ed25519 keys never.
const tlsUsages = (k: string): KeyUsage[] => (k.startsWith('rsa') || k === 'other-rsa' ? ['digitalSignature', 'keyEncipherment'] : ['digitalSignature']);

export const PROFILES: Readonly<Record<ProfileName, CertificateProfile>> = Object.freeze({
  root: { name: 'root', ca: true, keyUsage: caUsages, extendedKeyUsage: [], ocspNoCheck: false, subjectAltName: 'none', defaultValidityDays: 20 * 365, maxValidityDays: 30 * 365, signedByRoot: true },
  intermediate: { name: 'intermediate', ca: true, keyUsage: caUsages, extendedKeyUsage: [], ocspNoCheck: false, subjectAltName: 'none', defaultValidityDays: 10 * 365, maxValidityDays: 20 * 365, signedByRoot: true },
  'ocsp-signer': { name: 'ocsp-signer', ca: false, keyUsage: (): KeyUsage[] => ['digitalSignature'], extendedKeyUsage: [EKU.ocspSigning], ocspNoCheck: true, subjectAltName: 'none', defaultValidityDays: 365, maxValidityDays: 2 * 365, signedByRoot: false },
  'tls-server': { name: 'tls-server', ca: false, keyUsage: tlsUsages, extendedKeyUsage: [EKU.serverAuth], ocspNoCheck: false, subjectAltName: 'required', defaultValidityDays: 397, maxValidityDays: 397, signedByRoot: false },
  device: { name: 'device', ca: false, keyUsage: (): KeyUsage[] => ['digitalSignature'], extendedKeyUsage: [EKU.clientAuth], ocspNoCheck: false, subjectAltName: 'optional', defaultValidityDays: 365, maxValidityDays: 20 * 365, signedByRoot: false },
});

export function profileByName(name: string): CertificateProfile {
  // Own properties only: "constructor", "toString" or "__proto__" are not profiles.
  const p = Object.hasOwn(PROFILES, name) ? (PROFILES as Record<string, CertificateProfile>)[name] : undefined;
  if (!p) throw new HallmarkError('UNKNOWN_PROFILE', `unknown profile ${JSON.stringify(name)} (one of ${PROFILE_NAMES.join(', ')})`);
  return p;
}

export interface ProfileInputs {
  readonly subjectPublicKeyInfo: Buffer;
  readonly subjectKeyKind: KeyAlgorithm | 'other-rsa' | 'other-ec';
  /** The issuer's subject key identifier; absent for a self-signed root (then AKI = SKI). */
  readonly issuerKeyId?: Buffer;
  readonly altNames?: AltNames;
  /** CA profiles: basicConstraints pathLenConstraint. */
  readonly pathLen?: number;
  /** Intermediate profile: permitted DNS subtrees / directory names. */
  readonly permittedDns?: readonly string[];
  readonly permittedDirectoryNames?: readonly Buffer[];
  /** Name-constrained CA profiles (a factory station's sub-CA): the SHA-256 of its package manifest. */
  readonly stationManifestSha256?: Buffer;
  /** Where relying parties find revocation status (end-entity profiles only): CRL Distribution Points and AIA. */
  readonly pointers?: RevocationPointers;
}

export interface RevocationPointers {
  readonly crl?: string;
  readonly ocsp?: string;
  readonly caIssuers?: string;
}

/** The pointer extensions for a profile, in a fixed order (none for CA or OCSP-signer certificates). */
export function pointerExtensions(profile: CertificateProfile, pointers: RevocationPointers | undefined): { readonly oid: string; readonly der: Buffer }[] {
  if (!pointers || profile.ca || profile.ocspNoCheck) return [];
  const out: { oid: string; der: Buffer }[] = [];
  if (pointers.crl) out.push({ oid: EXT.crlDistributionPoints, der: crlDistributionPoints([pointers.crl]) });
  if (pointers.ocsp || pointers.caIssuers) out.push({ oid: EXT.authorityInfoAccess, der: authorityInfoAccess({ ocsp: pointers.ocsp ? [pointers.ocsp] : [], caIssuers: pointers.caIssuers ? [pointers.caIssuers] : [] }) });
  return out;
}

function hasAltNames(a?: AltNames): boolean {
  return !!a && [a.dns, a.ip, a.uri, a.email].some((l) => (l?.length ?? 0) > 0);
}

/** The DER extensions a certificate of this profile carries, in a fixed order. */
export function extensionsFor(profile: CertificateProfile, inputs: ProfileInputs): Buffer[] {
  const ski = keyIdentifier(inputs.subjectPublicKeyInfo);
  const out: Buffer[] = [basicConstraints(profile.ca, profile.ca ? inputs.pathLen : undefined), keyUsage(profile.keyUsage(inputs.subjectKeyKind))];
  if (profile.extendedKeyUsage.length) out.push(extKeyUsage(profile.extendedKeyUsage));
  out.push(subjectKeyIdentifier(ski), authorityKeyIdentifier(inputs.issuerKeyId ?? ski));
  if (profile.subjectAltName === 'required' && !hasAltNames(inputs.altNames)) {
    throw new HallmarkError('PROFILE_VIOLATION', `profile ${profile.name} requires at least one subject alternative name (--dns or --ip)`);
  }
  if (profile.subjectAltName === 'none' && hasAltNames(inputs.altNames)) {
    throw new HallmarkError('PROFILE_VIOLATION', `profile ${profile.name} does not take subject alternative names`);
  }
  if (hasAltNames(inputs.altNames)) out.push(subjectAltName(inputs.altNames!));
  if (profile.ocspNoCheck) out.push(ocspNoCheck());
  out.push(...pointerExtensions(profile, inputs.pointers).map((e) => e.der));
  if (profile.ca && (inputs.permittedDns?.length || inputs.permittedDirectoryNames?.length)) {
    out.push(nameConstraints({ dns: inputs.permittedDns ?? [], directoryNames: inputs.permittedDirectoryNames ?? [] }));
  } else if (!profile.ca && (inputs.permittedDns?.length || inputs.permittedDirectoryNames?.length)) {
    throw new HallmarkError('PROFILE_VIOLATION', `name constraints apply only to CA certificates, not ${profile.name}`);
  }
  if (inputs.stationManifestSha256) {
    if (!profile.ca || !inputs.permittedDirectoryNames?.length) throw new HallmarkError('PROFILE_VIOLATION', 'a station manifest digest belongs only in a name-constrained sub-CA certificate (a factory station)');
    out.push(stationManifestExtension(inputs.stationManifestSha256));
  }
  return out;
}

export interface ExpectedCertificate {
  readonly serialHex: string;
  readonly issuer: Buffer;
  readonly subject: Buffer;
  readonly subjectPublicKeyInfo: Buffer;
  readonly notBefore: Date;
  readonly notAfter: Date;
  readonly signatureAlgorithm: Buffer;
  readonly issuerKeyId: Buffer;
  readonly pathLen?: number;
  readonly subjectKeyKind: ProfileInputs['subjectKeyKind'];
  readonly altNamesPresent: boolean;
  readonly nameConstraintsPresent: boolean;
  /** The pointer extensions the certificate must carry, exactly (DER). */
  readonly pointerExtensions?: readonly { readonly oid: string; readonly der: Buffer }[];
  /** The station manifest digest the certificate must carry, exactly. */
  readonly stationManifestSha256?: Buffer;
}

/**
 * Parse-back check: reads the encoded certificate with the independent DER reader and verifies every
 * field the profile fixes. Throws CERTIFICATE_CHECK_FAILED naming the first mismatch.
 */
export function checkAgainstProfile(profile: CertificateProfile, cert: ParsedCertificate, expected: ExpectedCertificate): void {
  const fail = (what: string): never => { throw new HallmarkError('CERTIFICATE_CHECK_FAILED', `issued ${profile.name} certificate fails its profile check: ${what}`); };
  if (cert.version !== 3) fail('not version 3');
  if (cert.serialNegativeOrZero || serialToHex(Buffer.from(cert.serialHex, 'hex')) !== expected.serialHex) fail('serial number');
  if (Buffer.from(cert.serialHex, 'hex').length > 20) fail('serial longer than 20 octets');
  if (!cert.tbsSignatureAlgorithm.equals(expected.signatureAlgorithm) || !cert.signatureAlgorithm.equals(expected.signatureAlgorithm)) fail('signature algorithm');
  if (!cert.issuer.equals(expected.issuer)) fail('issuer name');
  if (!cert.subject.equals(expected.subject)) fail('subject name');
  if (!cert.subjectPublicKeyInfo.equals(expected.subjectPublicKeyInfo)) fail('subject public key');
  if (Math.floor(cert.notBefore.getTime() / 1000) !== Math.floor(expected.notBefore.getTime() / 1000)) fail('notBefore');
  if (Math.floor(cert.notAfter.getTime() / 1000) !== Math.floor(expected.notAfter.getTime() / 1000)) fail('notAfter');
  if (cert.notAfter <= cert.notBefore) fail('validity period is empty');
  if (new Set(cert.extensionOrder).size !== cert.extensionOrder.length) fail('duplicate extension');

  const want = new Set<string>([EXT.basicConstraints, EXT.keyUsage, EXT.subjectKeyIdentifier, EXT.authorityKeyIdentifier]);
  if (profile.extendedKeyUsage.length) want.add(EXT.extKeyUsage);
  if (expected.altNamesPresent) want.add(EXT.subjectAltName);
  if (profile.ocspNoCheck) want.add(EXT.ocspNoCheck);
  if (expected.nameConstraintsPresent) want.add(EXT.nameConstraints);
  if (expected.stationManifestSha256) want.add(EXT.stationManifest);
  const pointers = new Map<string, Buffer>((expected.pointerExtensions ?? []).map((e) => [e.oid, e.der]));
  for (const oid of pointers.keys()) want.add(oid);
  for (const oid of cert.extensions.keys()) if (!want.has(oid)) fail(`unexpected extension ${oid}`);
  for (const oid of want) if (!cert.extensions.has(oid)) fail(`missing extension ${oid}`);

  const bc = cert.extensions.get(EXT.basicConstraints)!;
  const bcValue = decodeBasicConstraints(bc.value);
  if (!bc.critical || bcValue.ca !== profile.ca) fail('basicConstraints');
  if (profile.ca && bcValue.pathLen !== expected.pathLen) fail('basicConstraints pathLen');

  const ku = cert.extensions.get(EXT.keyUsage)!;
  const usages = decodeKeyUsage(ku.value).sort().join(',');
  if (!ku.critical || usages !== profile.keyUsage(expected.subjectKeyKind).slice().sort().join(',')) fail(`keyUsage ${usages}`);

  if (profile.extendedKeyUsage.length) {
    const eku = decodeOidSequence(cert.extensions.get(EXT.extKeyUsage)!.value, 'ExtendedKeyUsage').join(',');
    if (eku !== profile.extendedKeyUsage.join(',')) fail(`extendedKeyUsage ${eku}`);
  }
  const ski = decodeSubjectKeyId(cert.extensions.get(EXT.subjectKeyIdentifier)!.value);
  if (!ski.equals(keyIdentifier(expected.subjectPublicKeyInfo))) fail('subjectKeyIdentifier');
  const aki = decodeAuthorityKeyId(cert.extensions.get(EXT.authorityKeyIdentifier)!.value);
  if (!aki || !aki.equals(expected.issuerKeyId)) fail('authorityKeyIdentifier');
  if (expected.nameConstraintsPresent && !cert.extensions.get(EXT.nameConstraints)!.critical) fail('nameConstraints must be critical');
  if (expected.stationManifestSha256) {
    const got = cert.extensions.get(EXT.stationManifest)!;
    if (got.critical || !decodeStationManifestDigest(got.value).equals(expected.stationManifestSha256)) fail('station manifest digest');
  }
  for (const [oid, der] of pointers) {
    const got = cert.extensions.get(oid)!;
    if (!extension(oid, got.critical, got.value).equals(der)) fail(`${oid === EXT.crlDistributionPoints ? 'cRLDistributionPoints' : 'authorityInfoAccess'} value`);
  }
}
