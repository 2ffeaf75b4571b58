"""The detector kinds, in the order they are listed (`logitguard.defenses.detectors.KINDS`, ``fit-detector --kind``).

A module without imports, so that the CLI can offer the kinds without importing the detectors (and with them
scikit-learn): ``logitguard --help`` stays fast. Every kind names a `Detector` subclass registered under it;
`logitguard.defenses.detectors` refuses to import when the two disagree.
"""

DETECTOR_KINDS = ("msp", "maxlogit", "energy", "nonme", "insen", "kdensity", "learned", "learned-noisy",
                  "learned-ranked", "odds", "odds-single")
