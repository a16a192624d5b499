# Reparser re-reads files.
class Reparser
  def run(text)
    text.lines
  end
end
