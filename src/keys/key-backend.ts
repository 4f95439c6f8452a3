// Where CA keys live. One interface, one file per implementation:
//   file-backend.ts    keys encrypted at rest under a passphrase (scrypt + AES-256-GCM)
//   pkcs11-backend.ts  keys generated and kept inside a PKCS#11 token (SoftHSM2, YubiKey, HSM)
// A private key never leaves a backend unencrypted: callers get a Signer, never key bytes.

import type { KeyAlgorithm } from '../pki/algorithms.js';

export type KeyBackendKind = 'file' | 'pkcs11';

/** What the store and config files keep to find a key again. Contains no secret. */
export interface KeyRef {
  readonly backend: KeyBackendKind;
  /** Backend-specific id: a file key id, or a PKCS#11 URI (pkcs11:token=...;id=...). */
  readonly id: string;
  readonly algorithm: KeyAlgorithm;
}

export interface Signer {
  readonly ref: KeyRef;
  /** SubjectPublicKeyInfo DER of the key. */
  readonly publicKeySpki: Buffer;
  /**
   * Signs `data` with the scheme that signingSchemeFor(ref.algorithm) names (SHA-256 for P-256 and
   * RSA, SHA-384 for P-384, pure Ed25519). Returns the signature as X.509 carries it: DER
   * ECDSA-Sig-Value for ECDSA, raw bytes for RSA PKCS#1 v1.5 and Ed25519.
   */
  sign(data: Buffer): Promise<Buffer>;
}

export interface KeyBackend {
  readonly kind: KeyBackendKind;
  /** Creates a new key pair; `label` is a human name stored beside it (not secret, not unique). */
  generateKey(label: string, algorithm: KeyAlgorithm): Promise<KeyRef>;
  /** Opens a key for signing. Throws KEY_NOT_FOUND when the reference names no key. */
  signer(ref: KeyRef): Promise<Signer>;
  /** Releases sessions and handles. */
  close(): Promise<void>;
}
