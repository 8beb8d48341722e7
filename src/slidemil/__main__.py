from slidemil.cli import app

app()
